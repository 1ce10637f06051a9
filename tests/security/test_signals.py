"""Crashing the daemon with a signal: a file the daemon maps can shrink
under the mapping, and touching the vanished pages raises SIGBUS, which
kills a Python process outright (no exception, no cleanup)."""

from __future__ import annotations

from collections import Counter

from tests.conftest import DaemonFactory
from tests.security.conftest import Spawn, VictimOf, assert_recovered, assert_served, footprint

# What a load of a file that keeps changing may end with: loaded (OK),
# changed under the load (FAILED_PRECONDITION), bytes differ (DATA_LOSS),
# or seen empty or shorter when it was opened (OUT_OF_RANGE,
# INVALID_ARGUMENT). Never UNAVAILABLE (a dead daemon) or INTERNAL.
ACCEPTABLE = {"OK", "FAILED_PRECONDITION", "DATA_LOSS", "OUT_OF_RANGE", "INVALID_ARGUMENT"}


def test_file_truncated_while_the_daemon_verifies_it(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf
) -> None:
    """Attack: uid 12345 loads its own 32 MiB memfd with verify=True, 30
    times, while a thread of its truncates the memfd to 0 and grows it
    back, over and over.
    Defence: every load ends OK, FAILED_PRECONDITION or DATA_LOSS (or is
    refused as an empty/short file), never UNAVAILABLE or INTERNAL; the
    daemon is alive after the 30 loads and logged no traceback."""
    daemon = daemon_factory(public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("truncating_loads", runtime_dir=str(daemon.runtime_dir), attempts=30, size=32 << 20)
    victim.start()
    attacker.go()
    result = attacker.result(timeout_s=60)
    served = victim.stop()
    statuses = Counter(result["statuses"])
    print(f"30 loads of a memfd truncated {result['truncations']} times meanwhile: {dict(statuses)}")
    assert daemon.process.poll() is None, f"dmabufd died: exit {daemon.process.returncode} (-7 is SIGBUS)"
    assert set(statuses) <= ACCEPTABLE, dict(statuses)
    assert "Traceback" not in daemon.log()
    assert_served(served)
    assert_recovered(daemon, before)
