"""[scheduling]: the event loop and the call threads on the CPUs call_cpus
names, every other thread of the daemon on all the CPUs it was given; the
event loop at nice loop_nice, every other thread and helper at the
daemon's."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import dmabufd_client
from dmabufd.daemon import CALL_WORKERS
from dmabufd_common.cpus import format_cpus, parse_cpus
from tests.conftest import DaemonFactory, RunningDaemon

# Python 3.11 leaves its threads' names at the process's; gRPC's own
# threads (event_engine, lifeguard, ...) name themselves.
PYTHON_THREAD = "python"


@dataclass(frozen=True)
class Thread:
    name: str
    cpus: frozenset[int]
    nice: int


def threads(pid: int) -> dict[int, Thread]:
    """Each thread of `pid` by id (threads that end while they are read are
    left out)."""
    found: dict[int, Thread] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
            nice = os.getpriority(os.PRIO_PROCESS, int(task))
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task)] = Thread(name, parse_cpus(line.split(":", 1)[1]), nice)
    return found


def settled(pid: int, nice: int, timeout_s: float = 5.0) -> dict[int, Thread]:
    """threads(pid) once every thread but the loop has `nice`: a thread the
    loop starts has the loop's nice until its first step puts it back."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = threads(pid)
        if all(t.nice == nice for tid, t in found.items() if tid != pid) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def replace_helpers(daemon: RunningDaemon, client: dmabufd_client.Client) -> set[int]:
    """Kill the daemon's /proc helpers, then release until the loop has
    started new ones (the first Releases find them dead); the new pids."""
    killed = daemon.kill_helpers()
    deadline = time.monotonic() + 20
    while not (daemon.helpers() - killed) and time.monotonic() < deadline:
        client.allocate("64K").close()
    started = daemon.helpers() - killed
    assert started, "no helper was started again"
    return started


@pytest.fixture
def usable() -> frozenset[int]:
    cpus = frozenset(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: pinned and free threads cannot be told apart")
    return cpus


def test_call_cpus_hold_the_loop_and_call_threads_and_no_other(
    daemon_factory: DaemonFactory, usable: frozenset[int], tmp_path: Path
) -> None:
    cpu = max(usable)
    daemon = daemon_factory(f'[scheduling]\ncall_cpus = "{cpu}"\n')
    pid = daemon.process.pid
    before = threads(pid)
    assert before[pid].cpus == {cpu}, "the event loop runs on the CPU named"
    assert all(t.cpus == usable for t in before.values() if t.name != PYTHON_THREAD), "gRPC's threads are free"
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(1 << 20) * 4)
    with daemon.connect() as client:
        buffers = [client.allocate("64K") for _ in range(4)]
        for buffer in buffers:
            buffer.close()  # released from a call thread
        with client.load_file(weights, verify=True) as loaded:  # on a load thread
            assert loaded.stats.bytes == 4 << 20
            assert loaded.stats.verified
    after = threads(pid)
    assert after[pid].cpus == {cpu}
    assert all(t.cpus == usable for t in after.values() if t.name != PYTHON_THREAD), "gRPC's threads are free"
    pinned = [tid for tid, t in after.items() if tid != pid and t.cpus == {cpu}]
    assert 1 <= len(pinned) <= CALL_WORKERS, "the call threads, and only they, share the loop's CPU"
    started = [t for tid, t in after.items() if tid not in before and t.name == PYTHON_THREAD]
    assert any(t.cpus == usable for t in started), "the load's thread, started by the loop, has every CPU"
    assert set(t.cpus for t in after.values()) <= {frozenset({cpu}), usable}
    assert f"the event loop and call threads run on CPU(s) {format_cpus({cpu})}" in daemon.log()
    with daemon.connect() as client:
        new_helpers = replace_helpers(daemon, client)
    assert {frozenset(os.sched_getaffinity(helper)) for helper in new_helpers} == {usable}, "started by the loop"


def test_without_call_cpus_no_thread_is_pinned(daemon_factory: DaemonFactory, usable: frozenset[int]) -> None:
    daemon = daemon_factory()
    with daemon.connect() as client:
        client.allocate("64K").close()
    assert {t.cpus for t in threads(daemon.process.pid).values()} == {usable}
    assert "call threads run on" not in daemon.log()


def test_only_the_event_loop_runs_at_loop_nice(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: the daemon lowers its loop's nice")
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the daemon's, which it inherits
    loop_nice = min(-4, base)  # the default, never above the daemon's own
    daemon = daemon_factory()
    pid = daemon.process.pid
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(1 << 20) * 32)
    with daemon.connect() as client:
        with client.load_file(weights) as loaded:  # read on a load thread, started by the loop
            assert loaded.stats.bytes == 32 << 20
        # Released: its 32 MiB of pages are freed on a call thread, also the loop's.
        started = replace_helpers(daemon, client)  # and new /proc helpers
    after = settled(pid, base)
    assert after[pid].nice == loop_nice, "the event loop (the main thread) runs at Android's display priority"
    assert {t.nice for tid, t in after.items() if tid != pid} == {base}, after
    assert len(after) > 4, "the call, load and gRPC threads are there"
    assert {os.getpriority(os.PRIO_PROCESS, helper) for helper in started} == {base}, "started by the loop"
    if loop_nice != base:
        assert f"the event loop runs at nice {loop_nice}, every other thread at {base}" in daemon.log()


def test_a_loop_nice_not_below_the_daemons_leaves_every_thread_there(daemon_factory: DaemonFactory) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    daemon = daemon_factory("[scheduling]\nloop_nice = 19\n")
    with daemon.connect() as client:
        client.allocate("64K").close()
    assert {t.nice for t in threads(daemon.process.pid).values()} == {base}
    assert "the event loop runs at nice" not in daemon.log()
