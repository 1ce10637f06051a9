"""[scheduling] call_cpus: the event loop and the call threads on the CPUs
named, every other thread of the daemon on all the CPUs it was given."""

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


def threads(pid: int) -> dict[int, Thread]:
    """Each thread of `pid` by id (threads that end while they are read are
    left out)."""
    found: dict[int, Thread] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task)] = Thread(name, parse_cpus(line.split(":", 1)[1]))
    return found


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
