"""The event loop runs at a better nice than the rest of the daemon
(service/dmabufd/placement.py). A client that floods the loop makes it
busy; it must not get any other thread of the daemon, or any process the
daemon starts, to that nice."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import DaemonFactory, RunningDaemon
from tests.security.conftest import Spawn, VictimOf, assert_recovered, assert_served, footprint, limits

LOOP_NICE = -4  # the default


def nices(daemon: RunningDaemon) -> dict[int, int]:
    """Each thread's nice by id, and each /proc helper's (threads that end
    while they are read are left out)."""
    found = {}
    for task in [*map(int, os.listdir(f"/proc/{daemon.pid}/task")), *daemon.helpers()]:
        try:
            found[task] = os.getpriority(os.PRIO_PROCESS, task)
        except ProcessLookupError:
            continue
    return found


def test_a_flood_gets_only_the_loop_its_nice(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: uid 12345 floods ALLOCATE frames on its fd socket (refused
    ones, then valid ones it never reads) until the daemon ends its
    session, while a victim allocates and releases (its Releases ask the
    /proc helpers; the session's end is cleaned up on a call thread).
    Defence: the loop runs at nice -4 throughout; no other thread and no
    helper stays there (a thread the loop starts has its nice until its
    first step, so each is sampled again until settled); the victim is
    served and the daemon's fds and RSS come back."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root: the daemon lowers its loop's nice")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    loop_nice = min(LOOP_NICE, base)
    daemon = daemon_factory(limits(outbox_frames=64, outbox_stall_s=2.0), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("allocate_frame_flood", runtime_dir=str(daemon.runtime_dir), requests=300, stall_s=2.0)
    victim.start()
    attacker.go()
    loop_seen: set[int] = set()
    deadline = time.monotonic() + 60
    while attacker.process.poll() is None and time.monotonic() < deadline:
        sample = nices(daemon)
        assert sample[daemon.pid] == loop_nice, sample
        loop_seen |= {task for task, nice in sample.items() if task != daemon.pid and nice == loop_nice}
        time.sleep(0.02)
    result = attacker.result(timeout_s=60)
    served = victim.stop()
    assert result["hangup_after_s"] is not None, "the flood's session was ended"
    settle_by = time.monotonic() + 5
    while (stuck := {task for task, nice in nices(daemon).items() if task != daemon.pid and nice != base}) and (
        time.monotonic() < settle_by
    ):
        time.sleep(0.05)
    assert not stuck, f"threads or helpers kept the loop's nice: {stuck}"
    print(f"threads seen briefly at the loop's nice before their first step: {len(loop_seen)}")
    assert_served(served)
    assert_recovered(daemon, before)
