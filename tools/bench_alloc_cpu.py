#!/usr/bin/env python3
"""Daemon CPU per allocation, two source trees side by side.

    python tools/bench_alloc_cpu.py BASE_TREE [HEAD_TREE] [--rounds N]

Starts one daemon from each tree (each tree's `service/` and `common/`
first on PYTHONPATH; HEAD_TREE defaults to this checkout) and, from one
client, allocates 4 MiB memfds (heap "memfd": served on the event loop)
from them in turn: `--allocations` each round, released in groups of 64 as
`dmabufctl bench` does, the order swapped every round. Each round reads
the CPU time of the daemon's event loop (the main thread) and of the whole
daemon (every thread: releases and fd closes run on executor threads)
from /proc/<pid>/task/*/schedstat, in nanoseconds, around the run.

CPU time, not wall time: on a shared machine the wall time of a round moves
by 2x with what else runs, while the code's cost moves far less; and the
two daemons take turns, so both see the same machine. Prints each tree's
medians and the per-round HEAD / BASE ratios with their range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmabufd.heaps.memfd import MEMFD_HEAP_NAME
from dmabufd_client.bench import RELEASE_EVERY, drop, schedstat
from dmabufd_client.buffer import Buffer
from dmabufd_client.cli.output import positive_int
from dmabufd_client.client import Client, connect
from dmabufd_common.fdwire import CONTROL_SOCKET_NAME

CHECKOUT = Path(__file__).resolve().parent.parent
SIZE = 4 << 20


def cpu_ns(pid: int) -> tuple[int, int]:
    """(the main thread's, every thread's) CPU time so far."""
    loop = total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            used, _ = schedstat(pid, int(task))
        except (FileNotFoundError, ProcessLookupError):  # a thread that has just ended
            continue
        total += used
        if task == str(pid):
            loop = used
    return loop, total


def start_daemon(tree: Path, runtime: Path) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree / "service"), os.environ.get("PYTHONPATH")]))
    )
    command = [sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime), "--log-level", "warning"]
    daemon = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 20
    while not (runtime / CONTROL_SOCKET_NAME).exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise SystemExit(f"the daemon from {tree} did not start")
        time.sleep(0.05)
    return daemon


def allocate_and_release(client: Client, count: int) -> None:
    held: list[Buffer] = []
    for _ in range(count):
        held.append(client.allocate(SIZE, heap=MEMFD_HEAP_NAME, name="bench"))
        if len(held) >= RELEASE_EVERY:
            drop(client, held)
    drop(client, held)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("base", type=Path, help="the tree to compare against (a clone of an older commit)")
    parser.add_argument("head", type=Path, nargs="?", default=CHECKOUT, help="the tree measured (default: this one)")
    parser.add_argument(
        "--rounds", type=positive_int, default=20, help="rounds, each allocating from both (default 20)"
    )
    parser.add_argument(
        "--allocations", type=positive_int, default=500, help="allocations per daemon per round (default 500)"
    )
    args = parser.parse_args()
    trees = {"base": args.base.resolve(), "head": args.head.resolve()}
    for tree in trees.values():
        if not (tree / "service" / "dmabufd").is_dir():
            parser.error(f"{tree} holds no service/dmabufd")
    loop: dict[str, list[float]] = {name: [] for name in trees}
    whole: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="dmabufd-cpu-") as tmp:
        daemons: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, tree in trees.items():
                daemons[name] = start_daemon(tree, Path(tmp) / name)
            clients = {name: connect(Path(tmp) / name) for name in trees}
            for client in clients.values():
                allocate_and_release(client, 200)  # warm-up: imports, caches, first pages
            for round_index in range(args.rounds):
                order = ("base", "head") if round_index % 2 == 0 else ("head", "base")
                for name in order:
                    pid = daemons[name].pid
                    loop_before, whole_before = cpu_ns(pid)
                    allocate_and_release(clients[name], args.allocations)
                    loop_after, whole_after = cpu_ns(pid)
                    loop[name].append((loop_after - loop_before) / args.allocations / 1000)
                    whole[name].append((whole_after - whole_before) / args.allocations / 1000)
            for client in clients.values():
                client.close()
        finally:
            for daemon in daemons.values():
                daemon.terminate()
                daemon.wait(timeout=15)
    for name, tree in trees.items():
        print(
            f"{name} ({tree}): CPU per allocation, median: event loop {statistics.median(loop[name]):.1f} us, "
            f"whole daemon {statistics.median(whole[name]):.1f} us"
        )
    for label, cost in (("event loop", loop), ("whole daemon", whole)):
        ratios = [head / base for base, head in zip(cost["base"], cost["head"], strict=True)]
        print(
            f"head / base, {label}, per round: median {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}-{max(ratios):.3f}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
