"""fd exhaustion: every buffer, session and grant costs the daemon file
descriptors, and the daemon has a limited number of them. A client must
not be able to make it hold, send or spin on fds without bound."""

from __future__ import annotations

import time
from collections.abc import Callable

import dmabufd_client
from tests.conftest import DaemonFactory, RunningDaemon
from tests.security.conftest import (
    Spawn,
    VictimOf,
    assert_recovered,
    assert_served,
    cpu_used,
    footprint,
    limits,
)

# A daemon that holds connections and does nothing else must be idle.
IDLE_CPU_S = 0.5
SESSIONS_PER_UID = 8
FD_LIMIT = 256


def test_grants_that_name_too_many_buffers(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: uid 12345 grants one buffer named 30 000 times (a redeem
    would make the daemon send 30 000 fds), then 257 distinct buffers (over
    grant_buffers = 256), then makes 200 read-only grants of the same 8
    memfd buffers and redeems each.
    Defence: INVALID_ARGUMENT for the first two (a grant is a set of at most
    grant_buffers distinct buffers); the read-only redeems leave the
    daemon's fd count where it was after the first 5 (+- 4)."""
    daemon = daemon_factory(public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("grant_abuse", runtime_dir=str(daemon.runtime_dir), cycles=200, warmup_cycles=5)
    victim.start()
    attacker.go()
    attacker.expect("warm")
    warm = daemon.fd_count()
    attacker.send("continue")
    attacker.expect("cycled", timeout_s=60)
    cycled = daemon.fd_count()
    attacker.send("finish")
    result = attacker.result()
    served = victim.stop()
    print(f"daemon fds after 5 read-only redeems: {warm}, after 200: {cycled}")
    assert result["repeated"]["status"] == "INVALID_ARGUMENT", result["repeated"]
    assert result["too_many"]["status"] == "INVALID_ARGUMENT", result["too_many"]
    assert abs(cycled - warm) <= 4, f"195 more read-only redeems took the daemon from {warm} to {cycled} fds"
    assert_served(served)
    assert_recovered(daemon, before)


def test_connection_flood(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: uid 12345 opens 500 fd-socket connections and holds every
    session it gets.
    Defence: at most sessions_per_uid (8) get a HELLO; every other one gets
    an ERROR frame RESOURCE_EXHAUSTED (8) and is closed; the victim is
    served fast meanwhile; holding the sessions costs the daemon no CPU
    (< 0.5 s over 2 s)."""
    daemon = daemon_factory(limits(sessions_per_uid=SESSIONS_PER_UID), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("connection_flood", runtime_dir=str(daemon.runtime_dir), count=500)
    victim.start()
    attacker.go()
    holding = attacker.expect("holding", timeout_s=60)
    served = victim.stop()
    idle = cpu_used(daemon, 2.0)
    attacker.send("release")
    attacker.result()
    told = holding["told"]
    print(
        f"500 connections in {holding['seconds']:.1f} s: {told}; refused then closed: {holding['refused_and_closed']}"
    )
    assert 1 <= told.get("HELLO", 0) <= SESSIONS_PER_UID, told
    assert told.get("ERROR 8", 0) == 500 - told.get("HELLO", 0), told
    assert holding["refused_and_closed"] == told["ERROR 8"], "a refused connection must be closed"
    assert idle < IDLE_CPU_S, f"the daemon burnt {idle:.2f} CPU-s in 2 s holding idle connections"
    assert_served(served)
    assert_recovered(daemon, before)


def serves_a_new_client(daemon: RunningDaemon, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with dmabufd_client.connect(daemon.runtime_dir, timeout_s=2) as client:
                client.allocate("4K").close()
                return True
        except dmabufd_client.DmabufdError:
            time.sleep(0.2)
    return False


def test_flood_up_to_the_fd_limit(
    fd_limited_daemon: Callable[[str, int], RunningDaemon], spawn: Spawn, victim_of: VictimOf
) -> None:
    """Attack: against a daemon whose RLIMIT_NOFILE is 256 (hard) and whose
    sessions_per_uid is high, uid 12345 opens connections until the daemon
    cannot accept any more (accept fails with EMFILE) and holds them.
    Defence: the daemon does not spin on the listening socket it cannot
    accept from (< 0.5 CPU-s over 2 s), and serves a new client once the
    flood closes (that victim then is served fast). A victim cannot be
    served during the flood itself: a daemon out of fds makes no buffer
    for anyone."""
    daemon = fd_limited_daemon(limits(sessions_per_uid=4096), FD_LIMIT)
    before = footprint(daemon)
    attacker = spawn("fd_limit_flood", runtime_dir=str(daemon.runtime_dir), limit=400, give_up_after=5).go()
    holding = attacker.expect("holding", timeout_s=60)
    at_limit = daemon.fd_count()
    print(f"flood: {holding['told']}; the daemon holds {at_limit} fds of {FD_LIMIT}")
    assert at_limit >= FD_LIMIT - 16, "the flood did not bring the daemon to its fd limit"
    spinning = cpu_used(daemon, 2.0)
    attacker.send("release")
    attacker.result()
    assert spinning < IDLE_CPU_S, f"the daemon burnt {spinning:.2f} CPU-s in 2 s at its fd limit"
    assert serves_a_new_client(daemon, within_s=5), "the daemon stopped serving after the flood"
    assert_served(victim_of(daemon).sample(0.5))
    assert_recovered(daemon, before)
