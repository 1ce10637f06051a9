"""Errors never echo unbounded client input: a status message that quotes
a 100 KB argument costs the daemon memory and bandwidth per call, buries
the reason, and can push the status past gRPC's metadata limit, so the
client gets a transport error instead of the status."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import DaemonFactory
from tests.security.conftest import Spawn, VictimOf, assert_recovered, assert_served, footprint

MAX_MESSAGE_CHARS = 400


def test_oversized_arguments_get_short_errors(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf, shared_dir: Path
) -> None:
    """Attack: uid 12345 sends a 100 KB buffer name (Allocate), a 100 KB path
    under a loading root (LoadFile), and a 100 KB hex grant token (Redeem).
    Defence: INVALID_ARGUMENT for the name and the path, NOT_FOUND or
    INVALID_ARGUMENT for the token, each with a message under 400
    characters."""
    models = shared_dir / "models"
    models.mkdir(mode=0o755)
    long_path = (str(models) + "/" + "p" * 100_000)[:100_000]
    daemon = daemon_factory(f'[loading]\nroots = ["{models}"]\n', public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("oversized_arguments", runtime_dir=str(daemon.runtime_dir), long_path=long_path)
    victim.start()
    result = attacker.go().result()
    served = victim.stop()
    for what in ("name", "path", "token"):
        print(f"100 KB {what}: {result[what]['status']}, a {result[what]['message_len']}-character message")
    assert result["name"]["status"] == "INVALID_ARGUMENT", result["name"]["message"][:300]
    assert result["path"]["status"] == "INVALID_ARGUMENT", result["path"]["message"][:300]
    assert result["token"]["status"] in ("NOT_FOUND", "INVALID_ARGUMENT"), result["token"]["message"][:300]
    for what in ("name", "path", "token"):
        assert result[what]["message_len"] < MAX_MESSAGE_CHARS, (
            f"the {what} error is {result[what]['message_len']} long"
        )
    assert_served(served)
    assert_recovered(daemon, before)
