"""[scheduling]: the event loop and the call threads on the CPUs call_cpus
names, every other thread of the daemon on all the CPUs it was given; the
event loop at nice loop_nice, every other thread and helper at the
daemon's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from dmabufd.daemon import CALL_WORKERS
from dmabufd_common.cpus import format_cpus, parse_cpus
from tests.conftest import DaemonFactory

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
            nice = nice_of(f"/proc/{pid}/task/{task}/stat")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task)] = Thread(name, parse_cpus(line.split(":", 1)[1]), nice)
    return found


def nice_of(stat_path: str) -> int:
    """Field 19 of a stat file; the name (field 2) may hold spaces and ')'."""
    fields = Path(stat_path).read_text().rpartition(")")[2].split()
    return int(fields[19 - 3])


def helpers(daemon_pid: int) -> list[int]:
    """The daemon's /proc helpers (sessions/holders.py): its child processes."""
    children = Path(f"/proc/{daemon_pid}/task/{daemon_pid}/children").read_text().split()
    return [int(child) for child in children]


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


def test_without_call_cpus_no_thread_is_pinned(daemon_factory: DaemonFactory, usable: frozenset[int]) -> None:
    daemon = daemon_factory()
    with daemon.connect() as client:
        client.allocate("64K").close()
    assert {t.cpus for t in threads(daemon.process.pid).values()} == {usable}
    assert "call threads run on" not in daemon.log()


def test_only_the_event_loop_runs_at_loop_nice(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: the daemon lowers its loop's nice")
    daemon = daemon_factory()
    pid = daemon.process.pid
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(1 << 20) * 32)
    with daemon.connect() as client:
        with client.load_file(weights) as loaded:  # read on a load thread, started by the loop
            assert loaded.stats.bytes == 32 << 20
        # Released: its 32 MiB of pages are freed on a call thread, also the loop's.
        client.allocate("64K").close()  # freed on the loop itself
    after = threads(pid)
    assert after[pid].nice == -4, "the event loop (the main thread) runs at Android's display priority"
    assert {t.nice for tid, t in after.items() if tid != pid} == {0}, {tid: t for tid, t in after.items() if t.nice}
    assert len(after) > 4, "the call, load and gRPC threads are there"
    started = helpers(pid)
    assert started, "the /proc helpers run"
    assert {nice_of(f"/proc/{child}/stat") for child in started} == {0}
    assert "the event loop runs at nice -4, every other thread at 0" in daemon.log()


def test_loop_nice_zero_leaves_every_thread_at_the_daemons(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory("[scheduling]\nloop_nice = 0\n")
    with daemon.connect() as client:
        client.allocate("64K").close()
    assert {t.nice for t in threads(daemon.process.pid).values()} == {0}
    assert "the event loop runs at nice" not in daemon.log()
