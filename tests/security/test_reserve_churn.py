"""The memfd reserve ([heaps] memfd_reserve) as a target: every load that
takes a prepared memfd makes the daemon prepare another between loads. A
client loading a fitting file again and again must not slow the others,
nor leave the daemon holding more than the reserve's own fds."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dmabufd.heaps.reserve import RETRY_S
from tests.conftest import DaemonFactory, RunningDaemon
from tests.security.conftest import Spawn, VictimOf, assert_recovered, assert_served, footprint, write_file

RESERVE = 64 << 20
FILE_BYTES = 48 << 20  # fits the 64 MiB prepared memfd
LOADS = 20


def wait_until_prepared(daemon: RunningDaemon) -> None:
    deadline = time.monotonic() + 2 * RETRY_S
    with daemon.connect() as admin:  # root: told how much is ready
        while True:
            (memfd,) = [heap for heap in admin.heaps() if heap.name == "memfd"]
            if memfd.reserve_ready_bytes == RESERVE:
                return
            assert time.monotonic() < deadline, f"the reserve is not prepared again: {memfd}"
            time.sleep(0.02)


def test_loads_that_drain_the_reserve_back_to_back(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345 loads a file that fits the reserve twenty times
    back to back, taking each prepared memfd as soon as the daemon has made
    it. Defence: every load succeeds; the victim's allocate+release stays
    fast; the reserve fills again, and the daemon's fds and RSS come back
    to where they were with it full."""
    daemon = daemon_factory(f'[heaps]\nmemfd_reserve = ["{RESERVE}"]\n', public=True)
    weights = shared_dir / "weights.bin"
    write_file(weights, os.urandom(FILE_BYTES), 0o644)
    wait_until_prepared(daemon)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "loads",
        runtime_dir=str(daemon.runtime_dir),
        requests=[{"path": str(weights), "open_as": "rdonly", "keep_bytes": False}] * LOADS,
    )
    victim.start()
    attacker.go()
    outcomes = attacker.result(timeout_s=120)["outcomes"]
    served = victim.stop()
    assert [o["status"] for o in outcomes] == ["OK"] * LOADS, outcomes
    # The first took the memfd prepared before the attack (the others, one
    # each time the daemon prepared another between two loads).
    assert outcomes[0]["prepared"] == FILE_BYTES
    print(f"loads into prepared memory: {sum(bool(o['prepared']) for o in outcomes)} of {LOADS}")
    assert_served(served)
    wait_until_prepared(daemon)
    assert_recovered(daemon, before)
