"""[scheduling] call_cpus: the event loop and the call threads on the CPUs
named, every other thread of the daemon on all the CPUs it was given."""

from __future__ import annotations

import os
from pathlib import Path

from dmabufd_common.cpus import format_cpus, parse_cpus
from tests.conftest import DaemonFactory


def thread_cpus(pid: int) -> dict[int, frozenset[int]]:
    """Each thread's allowed CPUs, by thread id (threads that end while
    they are read are left out)."""
    found: dict[int, frozenset[int]] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task)] = parse_cpus(line.split(":", 1)[1])
    return found


def test_call_cpus_hold_the_loop_and_call_threads_and_no_other(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    usable = frozenset(os.sched_getaffinity(0))
    cpu = max(usable)
    daemon = daemon_factory(f'[scheduling]\ncall_cpus = "{cpu}"\n')
    pid = daemon.process.pid
    before = thread_cpus(pid)
    assert before[pid] == {cpu}, "the event loop runs on the CPU named"
    assert set(before.values()) <= {frozenset({cpu}), usable}
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(1 << 20) * 4)
    with daemon.connect() as client:
        buffers = [client.allocate("64K") for _ in range(4)]
        for buffer in buffers:
            buffer.close()  # released from a call thread
        with client.load_file(weights, verify=True) as loaded:  # on a load thread
            assert loaded.stats.bytes == 4 << 20
            assert loaded.stats.verified
    after = thread_cpus(pid)
    started = {tid: cpus for tid, cpus in after.items() if tid not in before}
    assert after[pid] == {cpu}
    assert set(after.values()) <= {frozenset({cpu}), usable}, "a thread with some other CPUs"
    pinned = [tid for tid, cpus in after.items() if tid != pid and cpus == {cpu}]
    assert pinned, "call threads share the loop's CPU"
    assert any(cpus == usable for cpus in started.values()), "the load's thread, started by the loop, has every CPU"
    assert f"the event loop and call threads run on CPU(s) {format_cpus({cpu})}" in daemon.log()


def test_without_call_cpus_no_thread_is_pinned(daemon_factory: DaemonFactory) -> None:
    usable = frozenset(os.sched_getaffinity(0))
    daemon = daemon_factory()
    with daemon.connect() as client:
        client.allocate("64K").close()
    assert set(thread_cpus(daemon.process.pid).values()) == {usable}
    assert "call threads run on" not in daemon.log()
