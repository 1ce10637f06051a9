"""`bench`: what the fd path costs next to gRPC itself (the measurements
are dmabufd_client.bench's; this runs them with a progress bar)."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from typing import Any

from rich.table import Table

from dmabufd_client import bench
from dmabufd_client.cli import output
from dmabufd_client.cli.output import VERSION_KEY, Schema
from dmabufd_client.cli.registry import AddCommand
from dmabufd_client.client import LOAD_METHODS, Client
from dmabufd_client.errors import InvalidArgument
from dmabufd_common.cpus import format_cpus
from dmabufd_common.units import format_size

BENCH = Schema(
    "the object",
    (
        VERSION_KEY,
        ("size", "bytes per buffer"),
        ("heap", "the heap asked for; null: chosen by usage"),
        ("iterations", "allocations timed"),
        ("clients", "client processes of the concurrent run"),
        ("throughput_seconds", "how long each throughput run allocates"),
        ("cpus", "the CPUs the bench and its client processes ran on (null: any)"),
        ("alloc_fd_p50_us", "allocate until the fd is in hand, median, microseconds"),
        ("alloc_fd_p99_us", "the same, 99th percentile"),
        ("grpc_health_p50_us", "a bare gRPC health check on the same channel, median"),
        ("grpc_health_p99_us", "the same, 99th percentile"),
        ("alloc_to_grpc_p50_ratio", "alloc_fd_p50_us / grpc_health_p50_us"),
        ("batch32_ms", f"one call allocating {bench.BATCH} buffers, median"),
        ("single_x32_ms", f"{bench.BATCH} single calls, median"),
        ("batch_speedup", "single_x32_ms / batch32_ms"),
        ("pool_8x_nv12_1080p_fresh_ms", "an 8-frame NV12 1080p pool, freshly allocated, median"),
        ("pool_8x_nv12_1080p_recycled_ms", "the same from the recycled pool"),
        ("allocs_per_s_1_client", "allocations per second (release included), 1 process"),
        ("allocs_per_s_n_clients", "the same from `clients` processes at once"),
        ("clients_speedup", "allocs_per_s_n_clients / allocs_per_s_1_client"),
        ("cpu_idle_1_client", "the machine's idle share of CPU time during the 1-process run (null: no /proc/stat)"),
        ("cpu_idle_n_clients", "the same during the run of `clients` processes"),
        (
            "daemon_loop_on_cpu_1_client",
            "share of the 1-process run's wall time the daemon's event loop spent on a CPU (null: no --daemon-pid)",
        ),
        ("daemon_loop_waiting_1_client", "the same, runnable but waiting for a CPU"),
        ("daemon_loop_on_cpu_n_clients", "daemon_loop_on_cpu_1_client during the run of `clients` processes"),
        ("daemon_loop_waiting_n_clients", "daemon_loop_waiting_1_client during the run of `clients` processes"),
        ("beside_load_method", "the method of the loads run beside the allocations (null: no --beside-load)"),
        ("beside_load_alloc_fd_p50_us", "alloc_fd_p50_us while another session loads the --beside-load file"),
        ("beside_load_alloc_fd_p99_us", "the same, 99th percentile"),
        ("beside_load_alloc_fd_max_us", "the same, the slowest"),
        ("beside_load_loads", "loads completed meanwhile"),
        ("beside_load_seconds", "their median duration"),
    ),
)

STEPS = 6


def cmd_bench(client: Client, args: argparse.Namespace) -> int:
    size, heap, iterations = args.size, args.heap, args.iterations
    if args.cpus is not None:
        try:
            _run_on(args.cpus)
        except OSError as error:
            usable = format_cpus(os.sched_getaffinity(0))
            wanted = format_cpus(args.cpus)
            raise InvalidArgument(f"--cpus: cannot run on CPUs {wanted} ({error.strerror}); usable: {usable}") from None
    if args.daemon_pid is not None:
        try:
            bench.schedstat(args.daemon_pid)
        except OSError as error:
            raise InvalidArgument(
                f"--daemon-pid: cannot read the scheduler statistics of process {args.daemon_pid}'s main thread "
                f"({error.strerror or error}); give the pid of the running dmabufd"
            ) from None
    if args.beside_load is not None:
        try:  # before the other steps, not after them
            os.close(os.open(args.beside_load, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as error:
            raise InvalidArgument(f"--beside-load: cannot read {args.beside_load}: {error.strerror}") from None
    with output.progress_bar("bench", transfer=False) as update:
        update(total=STEPS, completed=0, description=f"warm-up ({min(100, iterations)} allocations)")
        bench.latencies(client, size, heap, min(100, iterations))
        update(completed=1, description=f"latency ({iterations} allocations and health checks)")
        alloc_s, health_s = bench.latencies(client, size, heap, iterations)
        update(completed=2, description=f"batch of {bench.BATCH} against {bench.BATCH} single calls")
        batch_s, singles_s = bench.batch_vs_singles(client, size, heap, rounds=20)
        update(completed=3, description="image pools, fresh and recycled")
        pool_fresh_s, pool_recycled_s = bench.pool_times(client, heap)
        seconds = args.seconds
        update(completed=4, description="throughput, 1 client process")
        single = bench.throughput(client.runtime_dir, size, heap, 1, seconds, daemon_pid=args.daemon_pid)
        update(completed=5, description=f"throughput, {args.clients} client processes")
        multi = bench.throughput(client.runtime_dir, size, heap, args.clients, seconds, daemon_pid=args.daemon_pid)
        beside = None
        if args.beside_load is not None:
            update(total=STEPS + 1, completed=6, description=f"latency beside {args.beside_method} loads")
            beside = bench.beside_load(client, size, heap, iterations, path=args.beside_load, method=args.beside_method)
        update(completed=STEPS if beside is None else STEPS + 1)
    alloc_p50, health_p50 = bench.percentile(alloc_s, 0.5), bench.percentile(health_s, 0.5)
    result: dict[str, Any] = output.versioned(
        BENCH,
        size=size,
        heap=heap or None,
        iterations=iterations,
        clients=args.clients,
        throughput_seconds=seconds,
        cpus=sorted(args.cpus) if args.cpus is not None else None,
        alloc_fd_p50_us=alloc_p50 * 1e6,
        alloc_fd_p99_us=bench.percentile(alloc_s, 0.99) * 1e6,
        grpc_health_p50_us=health_p50 * 1e6,
        grpc_health_p99_us=bench.percentile(health_s, 0.99) * 1e6,
        alloc_to_grpc_p50_ratio=alloc_p50 / health_p50,
        batch32_ms=batch_s * 1e3,
        single_x32_ms=singles_s * 1e3,
        batch_speedup=singles_s / batch_s,
        pool_8x_nv12_1080p_fresh_ms=pool_fresh_s * 1e3,
        pool_8x_nv12_1080p_recycled_ms=pool_recycled_s * 1e3,
        allocs_per_s_1_client=single.allocs_per_s,
        allocs_per_s_n_clients=multi.allocs_per_s,
        clients_speedup=multi.allocs_per_s / single.allocs_per_s,
        cpu_idle_1_client=single.cpu_idle,
        cpu_idle_n_clients=multi.cpu_idle,
        daemon_loop_on_cpu_1_client=single.daemon_loop.on_cpu if single.daemon_loop else None,
        daemon_loop_waiting_1_client=single.daemon_loop.waiting if single.daemon_loop else None,
        daemon_loop_on_cpu_n_clients=multi.daemon_loop.on_cpu if multi.daemon_loop else None,
        daemon_loop_waiting_n_clients=multi.daemon_loop.waiting if multi.daemon_loop else None,
        **_beside_fields(beside, args.beside_method),
    )
    if args.json:
        output.emit_json(result)
        return 0
    table = Table(
        title=f"dmabufd bench: {format_size(size)} buffers, heap {heap or '(by usage)'}, {iterations} iterations"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("allocate+fd p50 / p99", f"{result['alloc_fd_p50_us']:.0f} / {result['alloc_fd_p99_us']:.0f} us")
    table.add_row(
        "gRPC health p50 / p99", f"{result['grpc_health_p50_us']:.0f} / {result['grpc_health_p99_us']:.0f} us"
    )
    table.add_row("ratio (p50)", f"{result['alloc_to_grpc_p50_ratio']:.2f}x")
    table.add_row(f"batch of {bench.BATCH} (one call)", f"{result['batch32_ms']:.2f} ms")
    table.add_row(f"{bench.BATCH} single calls", f"{result['single_x32_ms']:.2f} ms")
    table.add_row("batch speed-up", f"{result['batch_speedup']:.1f}x")
    table.add_row("pool 8 x NV12 1080p, fresh", f"{pool_fresh_s * 1e3:.2f} ms")
    table.add_row("pool 8 x NV12 1080p, recycled", f"{pool_recycled_s * 1e3:.2f} ms")
    table.add_row("allocations/s, 1 client", f"{single.allocs_per_s:.0f}")
    table.add_row(f"allocations/s, {args.clients} clients", f"{multi.allocs_per_s:.0f}")
    table.add_row(f"{args.clients} clients / 1 client", f"{result['clients_speedup']:.2f}x")
    for label, run in (("1 client", single), (f"{args.clients} clients", multi)):
        if run.cpu_idle is not None:
            table.add_row(f"machine CPU idle, {label}", f"{run.cpu_idle:.0%}")
    for label, run in (("1 client", single), (f"{args.clients} clients", multi)):
        if run.daemon_loop is not None:
            share = run.daemon_loop
            table.add_row(f"daemon loop on CPU / waiting, {label}", f"{share.on_cpu:.0%} / {share.waiting:.0%}")
    if beside is not None:
        table.add_row(
            f"allocate+fd p50 / p99 / max beside {args.beside_method} loads",
            f"{result['beside_load_alloc_fd_p50_us']:.0f} / {result['beside_load_alloc_fd_p99_us']:.0f} / "
            f"{result['beside_load_alloc_fd_max_us']:.0f} us",
        )
        table.add_row("loads meanwhile, median", f"{len(beside.load_s)}, {statistics.median(beside.load_s):.3f} s")
    output.stdout.print(table)
    return 0


def _beside_fields(beside: bench.BesideLoad | None, method: str) -> dict[str, Any]:
    """The beside_load_* fields: null where --beside-load was not given."""
    if beside is None:
        return {key: None for key, _ in BENCH.keys if key.startswith("beside_load_")}
    return {
        "beside_load_method": method,
        "beside_load_alloc_fd_p50_us": bench.percentile(beside.alloc_s, 0.5) * 1e6,
        "beside_load_alloc_fd_p99_us": bench.percentile(beside.alloc_s, 0.99) * 1e6,
        "beside_load_alloc_fd_max_us": max(beside.alloc_s) * 1e6,
        "beside_load_loads": len(beside.load_s),
        "beside_load_seconds": statistics.median(beside.load_s),
    }


def _run_on(cpus: frozenset[int]) -> None:
    """Move every thread of this process (gRPC's included) to `cpus`; the
    client processes started later inherit it."""
    os.sched_setaffinity(0, cpus)  # first: refuses CPUs that are not there
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setaffinity(int(task), cpus)


def register(add: AddCommand) -> None:
    command = add(
        "bench",
        "measure allocation latency and throughput against the running daemon",
        cmd_bench,
        output.document(BENCH),
    )
    command.add_argument(
        "--size", type=output.size, default=4 << 20, help=f"bytes per buffer (default 4M; {output.SIZE_HELP})"
    )
    command.add_argument(
        "--iterations", type=output.positive_int, default=2000, metavar="N", help="allocations timed (default 2000)"
    )
    command.add_argument(
        "--clients", type=output.positive_int, default=8, metavar="N", help="concurrent client processes (default 8)"
    )
    command.add_argument(
        "--seconds",
        type=output.positive_seconds,
        default=3.0,
        metavar="S",
        help="how long each throughput run allocates, once every client has connected (default 3)",
    )
    command.add_argument("--heap", default="", help="heap name or alias (default: chosen by usage)")
    command.add_argument(
        "--cpus",
        type=output.cpus,
        metavar="LIST",
        help="run the bench and its client processes on these CPUs only (1, 2-3, 0,2-3): "
        "with the daemon on others, shows what scheduling placement costs",
    )
    command.add_argument(
        "--daemon-pid",
        type=output.positive_int,
        metavar="PID",
        help="the running dmabufd's pid: report how much of each throughput run its event loop spent on a CPU "
        "and how much runnable but waiting for one (from /proc/PID/task/PID/schedstat)",
    )
    command.add_argument(
        "--beside-load",
        metavar="FILE",
        help="last, time the allocations again while another session loads FILE again and again "
        "(at least 3 times): what a heavy load costs the daemon's other clients",
    )
    command.add_argument(
        "--beside-method",
        choices=list(LOAD_METHODS.values()),
        default="auto",
        help="the method of the --beside-load loads (default auto)",
    )
