"""Loads are the heaviest thing a client can ask for: eight lanes copying
into fresh memory. A client loading again and again must not leave the
daemon's other clients waiting for a CPU."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import DaemonFactory
from tests.security.conftest import Spawn, VictimOf, assert_recovered, assert_served, footprint, write_file

FILE_BYTES = 256 << 20
LOADS = 12
# Tighter than the p99 every attack is held to (VICTIM_P99_MS). Before
# 5744b67 the lanes faulted fresh memfd pages in on both cores, and this
# test's victim saw 82 and 129 ms at p99 (two runs); since, 10.6-11.7 ms.
VICTIM_P99_BESIDE_LOADS_MS = 30.0


def test_buffered_loads_back_to_back(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345 loads a 256 MiB file it may read, cached (though
    the daemon does not tell this uid so: it reads as if from the device,
    through its bounce buffers), with the buffered-read method (the one
    that used to fill a memfd through a mapping), twelve times back to back.
    Defence: every load succeeds; the victim's allocate+release stays under
    30 ms at p99 and is never stalled; the daemon's fds and RSS come back."""
    daemon = daemon_factory(public=True)
    weights = shared_dir / "weights.bin"
    write_file(weights, os.urandom(FILE_BYTES), 0o644)
    weights.read_bytes()  # into the page cache
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "loads",
        runtime_dir=str(daemon.runtime_dir),
        requests=[{"path": str(weights), "open_as": "rdonly", "method": "buffered-read", "keep_bytes": False}] * LOADS,
    )
    victim.start()
    attacker.go()
    outcomes = attacker.result(timeout_s=120)["outcomes"]
    served = victim.stop()
    assert [o["status"] for o in outcomes] == ["OK"] * LOADS, outcomes
    seconds = ", ".join(f"{o['seconds']:.2f}" for o in outcomes)
    print(f"loads took {seconds} s")
    assert_served(served)
    assert served.p99_ms < VICTIM_P99_BESIDE_LOADS_MS, f"the victim waited beside the loads: {served}"
    assert_recovered(daemon, before)
