"""`dmabufctl`: inspect and exercise a running dmabufd.

Every command prints a table for people, or JSON with --json for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from dmabufd_client.buffer import BufferInfo
from dmabufd_client.client import Client, HeapInfo, connect
from dmabufd_client.errors import DmabufdError
from dmabufd_client.loading import LoadedFile
from dmabufd_common.paths import RUNTIME_DIR_ENV
from dmabufd_common.units import format_size, parse_size

console = Console()


def _emit_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _heap_dict(heap: HeapInfo) -> dict[str, Any]:
    return {**asdict(heap), "backend": heap.backend.name.lower()}


def _buffer_dict(info: BufferInfo) -> dict[str, Any]:
    return {**asdict(info), "backend": info.backend.name.lower()}


def cmd_heaps(client: Client, args: argparse.Namespace) -> int:
    heaps = client.heaps()
    routes = client.usage_routes()
    if args.json:
        _emit_json({"heaps": [_heap_dict(h) for h in heaps], "usage_routes": {k: list(v) for k, v in routes.items()}})
        return 0
    table = Table(title="heaps")
    for column in ("name", "backend", "device", "importable", "max buffer", "aliases", "allowed"):
        table.add_column(column)
    for heap in heaps:
        table.add_row(
            heap.name,
            heap.backend.name.lower(),
            heap.device_path or "-",
            "yes" if heap.device_importable else "no",
            format_size(heap.max_buffer_bytes),
            ", ".join(heap.aliases) or "-",
            "yes" if heap.allowed else "no",
        )
    console.print(table)
    routes_table = Table(title="usage routes (first present and allowed heap wins)")
    routes_table.add_column("usage")
    routes_table.add_column("heap order")
    for usage, order in sorted(routes.items()):
        routes_table.add_row(usage, " -> ".join(order))
    console.print(routes_table)
    return 0


def cmd_alloc(client: Client, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    buffers = client.allocate_batch(args.size, args.count, heap=args.heap, usage=args.usage, name=args.name)
    elapsed = time.perf_counter() - started
    try:
        if args.json:
            _emit_json({"seconds": elapsed, "buffers": [_buffer_dict(b.info) for b in buffers]})
        else:
            table = Table(title=f"{len(buffers)} buffer(s) in {elapsed * 1000:.2f} ms")
            for column in ("id", "heap", "backend", "size", "kernel name", "fd"):
                table.add_column(column)
            for buffer in buffers:
                info = buffer.info
                table.add_row(
                    str(info.id),
                    info.heap,
                    info.backend.name.lower(),
                    format_size(info.size),
                    info.kernel_name,
                    str(buffer.fileno()),
                )
            console.print(table)
        if args.hold:
            if not args.json:
                console.print(f"holding for {args.hold:.0f} s (session {client.session_id}) ...")
            time.sleep(args.hold)
    finally:
        for buffer in buffers:
            buffer.close()
    return 0


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    stats = client.stats(check_proc=args.proc)
    if args.json:
        _emit_json(MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
        return 0
    clients = Table(title="clients" if stats.all_clients else "clients (yours only: not an admin)")
    columns = ["session", "pid", "uid", "command", "buffers", "bytes", "quota"]
    if args.proc:
        columns += ["seen in /proc", "all dma-bufs (fdinfo)"]
    for column in columns:
        clients.add_column(column)
    for c in stats.clients:
        row = [
            str(c.session_id),
            str(c.pid),
            str(c.uid),
            c.command or "?",
            str(c.buffer_count),
            format_size(c.bytes),
            f"{format_size(c.quota_bytes)} / {c.quota_buffers}",
        ]
        if args.proc:
            row.append(f"{c.proc_buffer_count} ({format_size(c.proc_bytes)})" if c.proc_checked else "unreadable")
            row.append(f"{c.proc_dmabuf_count} ({format_size(c.proc_dmabuf_bytes)})" if c.proc_checked else "-")
        clients.add_row(*row)
    console.print(clients)
    heaps = Table(title="heaps")
    for column in ("heap", "buffers", "bytes"):
        heaps.add_column(column)
    for h in stats.heaps:
        heaps.add_row(h.heap, str(h.buffer_count), format_size(h.bytes))
    heaps.add_row("total", str(stats.total_buffers), format_size(stats.total_bytes), style="bold")
    console.print(heaps)
    console.print(
        f"since start: {stats.allocations} allocated, {stats.releases} released, {stats.denials} denied, "
        f"{stats.sessions_opened} sessions opened, {stats.sessions_closed} closed"
    )
    return 0


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    seen = 0
    for event in client.watch_heaps(include_existing=not args.no_existing):
        if args.json:
            print(json.dumps({"event": event.kind, "heap": _heap_dict(event.heap) if event.heap else None}), flush=True)
        elif event.heap is None:
            console.print(f"[dim]{event.kind}[/dim]")
        else:
            console.print(f"{event.kind:8} {event.heap.name} ({event.heap.backend.name.lower()})")
        if event.kind != "synced":
            seen += 1
        if (args.count and seen >= args.count) or (deadline and time.monotonic() > deadline):
            break
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    def load(progress: Callable[[int, int], None] | None) -> LoadedFile:
        return client.load_file(
            args.path,
            offset=args.offset,
            length=args.length,
            heap=args.heap,
            usage=args.usage,
            name=args.name,
            method=args.method,
            verify=args.verify,
            max_buffer_bytes=args.max_buffer,
            by_path=args.by_path,
            progress=progress,
        )

    started = time.perf_counter()
    if args.json:
        loaded = load(None)
    else:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(f"loading {args.path}", total=None)
            loaded = load(lambda done, total: bar.update(task, completed=done, total=total))
    seconds = time.perf_counter() - started
    with loaded:
        stats = loaded.stats
        rate = stats.bytes / stats.wall_seconds / 1e6 if stats.wall_seconds else 0.0
        if args.json:
            _emit_json(
                {
                    "path": str(args.path),
                    "method": stats.method,
                    "bytes": stats.bytes,
                    "seconds": seconds,
                    "daemon_wall_seconds": stats.wall_seconds,
                    "daemon_cpu_seconds": stats.cpu_seconds,
                    "mb_per_s": rate,
                    "verified": stats.verified,
                    "parallelism": stats.parallelism,
                    "buffers": [_buffer_dict(b.info) for b in loaded.buffers],
                    "segments": [asdict(segment) for segment in loaded.segments],
                }
            )
        else:
            table = Table(title=f"{args.path}: {format_size(stats.bytes)} by {stats.method}")
            for column in ("buffer", "heap", "size", "file offset", "bytes", "at"):
                table.add_column(column)
            for segment in loaded.segments:
                info = loaded.buffer_of(segment).info
                table.add_row(
                    str(info.id),
                    info.heap,
                    format_size(info.size),
                    str(segment.file_offset),
                    str(segment.length),
                    str(segment.buffer_offset),
                )
            console.print(table)
            verified = "verified against the file" if stats.verified else "not verified (--verify)"
            console.print(
                f"{rate:.0f} MB/s in the daemon ({stats.wall_seconds:.3f} s wall, {stats.cpu_seconds:.3f} s CPU, "
                f"{stats.parallelism} in flight); {seconds:.3f} s end to end; {verified}"
            )
        if args.hold:
            time.sleep(args.hold)
    return 0


def cmd_bench(_client: Client | None, args: argparse.Namespace) -> int:
    from dmabufd_client.bench import run_benchmark

    return run_benchmark(args)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmabufctl", description="Talk to a running dmabufd.")
    parser.add_argument("--runtime-dir", type=Path, help=f"the daemon's runtime directory (env {RUNTIME_DIR_ENV})")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("heaps", help="list heaps, their capabilities and usage routes").set_defaults(run=cmd_heaps)

    alloc = sub.add_parser("alloc", help="allocate buffers (released when the command exits)")
    alloc.add_argument("--size", type=_size, required=True, help="bytes per buffer: 4096, 4K, 64M, 1G")
    alloc.add_argument("--count", type=int, default=1)
    alloc.add_argument("--heap", default="", help="heap name or alias (default: by usage)")
    alloc.add_argument("--usage", default="", help="usage hint, e.g. camera, model-weights")
    alloc.add_argument("--name", default="dmabufctl", help="label shown in fdinfo (<= 23 bytes)")
    alloc.add_argument("--hold", type=float, default=0, help="keep the buffers this many seconds")
    alloc.set_defaults(run=cmd_alloc)

    stats = sub.add_parser("stats", help="who holds what, per client and per heap")
    stats.add_argument("--proc", action="store_true", help="cross-check against /proc/<pid>/fd")
    stats.set_defaults(run=cmd_stats)

    watch = sub.add_parser("watch", help="print heaps as they appear and disappear")
    watch.add_argument("--no-existing", action="store_true", help="only changes, not the current heaps")
    watch.add_argument("--count", type=int, default=0, help="stop after this many add/remove events")
    watch.add_argument("--timeout", type=float, default=0, help="stop after this many seconds")
    watch.set_defaults(run=cmd_watch)

    load = sub.add_parser("load", help="load a file into buffers (released when the command exits)")
    load.add_argument("path", type=Path)
    load.add_argument("--offset", type=_size, default=0)
    load.add_argument("--length", type=_size, default=0, help="bytes to load (default: to the end)")
    load.add_argument("--heap", default="")
    load.add_argument("--usage", default="model-weights")
    load.add_argument("--name", default="dmabufctl-load")
    load.add_argument(
        "--method",
        default="auto",
        choices=["auto", "direct-cfr", "direct-read", "sendfile", "splice", "buffered-read"],
    )
    load.add_argument("--verify", action="store_true", help="compare the loaded bytes with the file")
    load.add_argument("--max-buffer", type=_size, default=0, help="split into buffers of at most this size")
    load.add_argument("--by-path", action="store_true", help="send the path, not an fd (daemon policy decides)")
    load.add_argument("--hold", type=float, default=0, help="keep the buffers this many seconds")
    load.set_defaults(run=cmd_load)

    bench = sub.add_parser("bench", help="measure allocation latency and throughput")
    bench.add_argument("--size", type=_size, default=4 << 20)
    bench.add_argument("--iterations", type=int, default=2000)
    bench.add_argument("--clients", type=int, default=8, help="concurrent client processes")
    bench.add_argument("--heap", default="")
    bench.set_defaults(run=cmd_bench, no_session=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[Any, argparse.Namespace], int] = args.run
    try:
        if getattr(args, "no_session", False):
            return run(None, args)
        with connect(args.runtime_dir, timeout_s=args.timeout) as client:
            return run(client, args)
    except DmabufdError as error:
        status = error.status.name if error.status is not None else "ERROR"
        if args.json:
            _emit_json({"error": status, "message": error.message})
        else:
            Console(stderr=True).print(f"[red]dmabufctl: {status}[/red]: {error.message}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
