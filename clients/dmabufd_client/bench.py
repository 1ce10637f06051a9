"""`dmabufctl bench`: what the fd path costs next to gRPC itself.

Measured in one run, side by side, against a running daemon:
- latency of allocate(size) until the fd is in hand, and of a bare gRPC
  health check on the same channel, interleaved so both see the same load;
- one batch call of 32 buffers against 32 single calls;
- allocations per second from 1 client and from N client processes;
- optionally, allocate(size) latency again while another session loads a
  file over and over (beside_load): what a heavy load costs the daemon's
  other clients.
Buffers are released in groups outside the timed sections.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmabufd_client.buffer import Buffer
from dmabufd_client.client import Client, connect

RELEASE_EVERY = 64
BATCH = 32
# beside_load gives up on a first load that takes longer than this.
FIRST_LOAD_TIMEOUT_S = 120.0


def drop(client: Client, buffers: list[Buffer]) -> None:
    """Close a group of buffers' fds, then release them in one call (a
    buffer released while its fd is open stays charged until it is closed)."""
    if buffers:
        ids = [b.id for b in buffers]
        for buffer in buffers:
            os.close(buffer.detach())
        client.release(ids)
        buffers.clear()


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latencies(client: Client, size: int, heap: str, iterations: int) -> tuple[list[float], list[float]]:
    alloc_s: list[float] = []
    health_s: list[float] = []
    held: list[Buffer] = []
    for _ in range(iterations):
        started = time.perf_counter()
        client.health()
        health_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        held.append(client.allocate(size, heap=heap, name="bench"))
        alloc_s.append(time.perf_counter() - started)
        if len(held) >= RELEASE_EVERY:
            drop(client, held)
    drop(client, held)
    return alloc_s, health_s


def batch_vs_singles(client: Client, size: int, heap: str, rounds: int) -> tuple[float, float]:
    batch_s: list[float] = []
    singles_s: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        held = client.allocate_batch(size, BATCH, heap=heap, name="bench")
        batch_s.append(time.perf_counter() - started)
        drop(client, held)
        started = time.perf_counter()
        held = [client.allocate(size, heap=heap, name="bench") for _ in range(BATCH)]
        singles_s.append(time.perf_counter() - started)
        drop(client, held)
    return statistics.median(batch_s), statistics.median(singles_s)


@dataclass(frozen=True)
class BesideLoad:
    """allocate(size) latencies measured while another session loaded a
    file again and again, and how long those loads took."""

    alloc_s: list[float]
    load_s: list[float]


def beside_load(
    client: Client, size: int, heap: str, iterations: int, *, path: str, method: str, loads: int = 3
) -> BesideLoad:
    """Time `iterations` allocations while a second session of this process
    loads `path` with `method`, one load after another, at least `loads`
    times (the allocations continue until then). The loading session runs
    on a thread: its calls wait in gRPC without the GIL."""
    stop = threading.Event()
    load_s: list[float] = []
    failure: list[BaseException] = []
    loader = connect(client.runtime_dir)

    def load_again_and_again() -> None:
        try:
            with loader:
                while not stop.is_set():
                    started = time.perf_counter()
                    loader.load_file(path, method=method, name="bench-beside").close()
                    load_s.append(time.perf_counter() - started)
        except BaseException as error:  # reported by the caller, on its thread
            failure.append(error)

    # A daemon thread: a load that never ends must not keep the bench alive.
    thread = threading.Thread(target=load_again_and_again, name="bench-beside-load", daemon=True)
    thread.start()
    alloc_s: list[float] = []
    held: list[Buffer] = []
    try:
        # From the end of the first load on: the file opened once, the
        # daemon's first load behind it.
        first_by = time.monotonic() + FIRST_LOAD_TIMEOUT_S
        while not load_s and not failure:
            if time.monotonic() > first_by:
                loader.close()  # cancels the load in flight
                raise TimeoutError(f"the first load of {path} took more than {FIRST_LOAD_TIMEOUT_S:g} s")
            time.sleep(0.01)
        while not failure and (len(alloc_s) < iterations or len(load_s) < loads):
            started = time.perf_counter()
            held.append(client.allocate(size, heap=heap, name="bench"))
            alloc_s.append(time.perf_counter() - started)
            if len(held) >= RELEASE_EVERY:
                drop(client, held)
    finally:
        stop.set()
        thread.join(timeout=FIRST_LOAD_TIMEOUT_S)
        drop(client, held)
    if failure:
        raise failure[0]
    return BesideLoad(alloc_s, load_s)


@dataclass(frozen=True)
class _Job:
    runtime_dir: str | None
    size: int
    heap: str
    seconds: float


def pool_times(client: Client, heap: str, rounds: int = 5) -> tuple[float, float]:
    """Median seconds to allocate an 8-frame NV12 1080p pool, fresh and recycled."""
    fresh: list[float] = []
    warm: list[float] = []
    for _ in range(rounds):
        with client.allocate_pool("NV12", 1920, 1080, 8, heap=heap, recycle=False) as pool:
            fresh.append(pool.allocation_seconds)
    client.allocate_pool("NV12", 1920, 1080, 8, heap=heap, recycle=True).close()
    for _ in range(rounds):
        with client.allocate_pool("NV12", 1920, 1080, 8, heap=heap, recycle=True) as pool:
            warm.append(pool.allocation_seconds)
    return statistics.median(fresh), statistics.median(warm)


def _worker(job: _Job, ready: Any, start: Any, results: Any) -> None:
    with connect(job.runtime_dir) as client:
        client.health()
        ready.put(os.getpid())
        start.wait()
        held: list[Buffer] = []
        count = 0
        began = time.perf_counter()
        deadline = began + job.seconds
        while time.perf_counter() < deadline:
            held.append(client.allocate(job.size, heap=job.heap, name="bench"))
            count += 1
            if len(held) >= RELEASE_EVERY:
                drop(client, held)
        drop(client, held)
        results.put((began, time.perf_counter(), count))


@dataclass(frozen=True)
class LoopShare:
    """Where the daemon's event loop (its main thread) spent a run, as
    shares of the run's wall time: on a CPU, and runnable but waiting for
    one. Together well below 1: it slept (waited for frames); `waiting`
    high while the machine has idle CPU: clients it woke took its CPU."""

    on_cpu: float
    waiting: float


@dataclass(frozen=True)
class Throughput:
    allocs_per_s: float
    # The whole machine's idle share of CPU time during the run (None
    # where /proc/stat cannot be read): whether the clients and the daemon
    # kept every CPU busy, or waited for each other.
    cpu_idle: float | None
    # None unless the daemon's pid was given.
    daemon_loop: LoopShare | None = None


def schedstat(pid: int, tid: int | None = None) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of thread `tid` of
    process `pid` (its main thread by default), from the kernel's
    scheduler statistics. Raises OSError if there is no such thread or
    the kernel keeps no such statistics (CONFIG_SCHED_INFO)."""
    with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as stat:
        fields = stat.read().split()
    try:
        return int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        raise OSError(f"/proc/{pid}/task/{tid or pid}/schedstat is not what Linux writes: {fields!r}") from None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(all, idle + iowait) CPU time of the whole machine from /proc/stat,
    in clock ticks (guest time is already counted in user and nice)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(field) for field in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return sum(fields), fields[3] + fields[4]


def throughput(
    runtime_dir: Path | None, size: int, heap: str, clients: int, seconds: float, *, daemon_pid: int | None = None
) -> Throughput:
    """Allocations per second (release included) from `clients` processes,
    each allocating for `seconds`; with `daemon_pid`, where the daemon's
    event loop spent that time (LoopShare).

    The clock starts once every process has connected: spawning and
    importing eight Pythons costs more CPU than the run itself on a small
    machine, and must not overlap it."""
    context = multiprocessing.get_context("spawn")  # a forked gRPC runtime is not safe
    ready = context.Queue()
    start = context.Event()
    results = context.Queue()
    job = _Job(str(runtime_dir) if runtime_dir else None, size, heap, seconds)
    workers = [context.Process(target=_worker, args=(job, ready, start, results)) for _ in range(clients)]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=120)
    before = _cpu_jiffies()
    loop_before = schedstat(daemon_pid) if daemon_pid is not None else None
    watched_from = time.perf_counter()
    start.set()
    spans = [results.get(timeout=120 + seconds) for _ in workers]
    after = _cpu_jiffies()
    loop_after = schedstat(daemon_pid) if daemon_pid is not None else None
    watched_s = time.perf_counter() - watched_from
    for worker in workers:
        worker.join()
    total = sum(int(count) for _, _, count in spans)
    wall = max(float(end) for _, end, _ in spans) - min(float(began) for began, _, _ in spans)
    idle = None
    if before is not None and after is not None and after[0] > before[0]:
        idle = (after[1] - before[1]) / (after[0] - before[0])
    loop = None
    if loop_before is not None and loop_after is not None:
        loop = LoopShare(
            (loop_after[0] - loop_before[0]) / 1e9 / watched_s, (loop_after[1] - loop_before[1]) / 1e9 / watched_s
        )
    return Throughput(total / wall, idle, loop)
