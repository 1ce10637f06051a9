"""One client stalls all: the daemon's threads, sockets and queues are
shared, so a client that never reads, never sends, or holds streams open
must lose its own session or calls, never slow down anyone else's."""

from __future__ import annotations

import time

import grpc

from dmabufd.transport.closer import MAX_PENDING_PER_UID
from tests.conftest import DaemonFactory
from tests.security.conftest import (
    Spawn,
    VictimOf,
    assert_recovered,
    assert_served,
    footprint,
    limits,
)

OUTBOX_STALL_S = 2.0
WATCHES_PER_UID = 16
CALLS_PER_UID = 32
# For the clients that do not read: a short stall limit, and a quota that
# lets the attacker's buffers pile up to it.
UNREAD_CONFIG = limits(outbox_frames=64, outbox_stall_s=OUTBOX_STALL_S, calls_per_uid=CALLS_PER_UID) + (
    "[quota.uids.12345]\nmax_buffers = 16384\n"
)


def test_client_that_never_reads_its_fd_socket(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf
) -> None:
    """Attack: a raw client of uid 12345 sends tickets and calls Allocate 200
    times (16 threads) without ever reading its fd socket, where the
    daemon sends each call's fds. Each call makes 64 buffers, so its frame
    (552 bytes) is large enough that 200 of them overflow what the kernel
    queues on the socket (167 on this machine; about 278 one-fd frames
    would fit): frames are left unwritten as well as unread.
    Defence: the victim's p99 stays < 100 ms; within outbox_stall_s (2 s)
    + 4 s of its first unread frame (or as soon as more than outbox_frames
    = 64 are queued) the attacker's session is ended: the daemon hangs up
    its fd socket and the next call gets UNAUTHENTICATED or UNAVAILABLE."""
    daemon = daemon_factory(UNREAD_CONFIG, public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn(
        "unread_allocations",
        runtime_dir=str(daemon.runtime_dir),
        calls=200,
        buffers=64,
        workers=16,
        stall_s=OUTBOX_STALL_S,
    )
    victim.start()
    attacker.go()
    result = attacker.result(timeout_s=60)
    served = victim.stop()
    print(
        f"200 Allocates never read, in {result['calls_seconds']:.1f} s: {result['statuses']}; "
        f"hung up after {result['hangup_after_s']} s; next call: {result['next_call']}"
    )
    assert result["hangup_after_s"] is not None, "the daemon kept the session of a client that never reads"
    assert result["hangup_after_s"] <= OUTBOX_STALL_S + 4
    assert result["next_call"] in ("UNAUTHENTICATED", "UNAVAILABLE"), result["next_call"]
    assert set(result["statuses"]) <= {"OK", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNAVAILABLE"}
    assert_served(served)
    assert_recovered(daemon, before)


def test_a_thousand_open_watch_streams(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: one session of uid 12345 opens 1000 WatchHeaps streams and
    never reads past their first message.
    Defence: each stream either streams (its first message arrives within
    2 s) or is refused RESOURCE_EXHAUSTED (watches_per_uid = 16); the victim
    is served fast while they are open; after they are cancelled the
    daemon's fds and RSS are back to the baseline. (The attacker opens
    them one after the other, a fresh ticket each: a refused call must
    consume its ticket, or the session runs out of tickets.)"""
    daemon = daemon_factory(limits(watches_per_uid=WATCHES_PER_UID, calls_per_uid=CALLS_PER_UID), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("watch_flood", runtime_dir=str(daemon.runtime_dir), count=1000, first_message_s=2.0).go()
    opened = attacker.expect("opened", timeout_s=60)["started"]
    print(f"1000 WatchHeaps streams: {opened}")
    served = victim.sample(1.0)
    attacker.send("cancel")
    attacker.result()
    assert set(opened) <= {"STREAMING", "RESOURCE_EXHAUSTED"}, opened
    assert 1 <= opened.get("STREAMING", 0) <= WATCHES_PER_UID, opened
    assert_served(served)
    assert_recovered(daemon, before)


def test_calls_whose_ticket_never_arrives(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: uid 12345 makes 300 concurrent calls with its valid session
    token and tickets it never sent: each makes the daemon wait 2 s for a
    ticket in vain.
    Defence: each call gets UNAUTHENTICATED (after the wait) or, beyond
    calls_per_uid (32) in flight, RESOURCE_EXHAUSTED at once; the victim's
    p99 stays < 100 ms meanwhile."""
    daemon = daemon_factory(limits(calls_per_uid=CALLS_PER_UID), public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("ticketless_calls", runtime_dir=str(daemon.runtime_dir), count=300, timeout_s=20.0).go()
    attacker.expect("ready")
    victim.start()
    attacker.send("fire")
    result = attacker.result(timeout_s=60)
    served = victim.stop()
    print(f"300 calls without tickets, {result['seconds']:.1f} s: {result['statuses']}")
    assert set(result["statuses"]) <= {"UNAUTHENTICATED", "RESOURCE_EXHAUSTED"}, result["statuses"]
    assert sum(result["statuses"].values()) == 300
    assert_served(served)
    assert_recovered(daemon, before)


def test_allocate_frames_flooded_and_never_read(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf
) -> None:
    """Attack: uid 12345 sends 300 ALLOCATE frames the daemon must refuse
    (garbage, a batch, an absurd size), then valid ALLOCATE frames as fast
    as its socket takes them, never reading the fds and REPLYs they bring.
    Defence: every refusal is a REPLY with INVALID_ARGUMENT (no protocol
    error, no crash); the flood is served at the pace of one uid's calls
    while the victim's p99 stays < 100 ms; once 64 frames wait unread (or
    one waits outbox_stall_s) the session ends, and every buffer it got is
    released: fds and RSS back to where they were."""
    daemon = daemon_factory(UNREAD_CONFIG, public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("allocate_frame_flood", runtime_dir=str(daemon.runtime_dir), requests=300, stall_s=OUTBOX_STALL_S)
    victim.start()
    attacker.go()
    result = attacker.result(timeout_s=60)
    served = victim.stop()
    print(
        f"refused: {result['refused']}; then {result['sent']} valid frames sent; "
        f"hung up after {result['hangup_after_s']} s"
    )
    assert result["refused"] == {"INVALID_ARGUMENT": 300}, result
    assert result["others"] == 0, "nothing but the REPLYs came back for refused requests"
    assert result["sent"] > 64, "the flood got past the outbox limit"
    assert result["hangup_after_s"] is not None, "the daemon kept the session of a client that never reads"
    assert result["hangup_after_s"] <= OUTBOX_STALL_S + 4
    assert_served(served)
    assert_recovered(daemon, before)


def test_files_whose_close_blocks(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: uid 12345 sends the daemon TCP sockets whose close() blocks
    for an hour (SO_LINGER, unsent data behind a zero window) as FILE
    deposits, and hangs up: the daemon holds the last reference of each
    and lets go of them as the sessions end. Closing any of them on the
    event loop would freeze every client.
    Defence: the closer takes them off the loop, so the victim is served
    throughout; once MAX_PENDING_PER_UID of the uid's fds are waiting, its
    sessions end and a new one is refused (RESOURCE_EXHAUSTED), and 200
    more refused connections, with nothing in them, cost the daemon no fd;
    when the closes return, the uid is served again and the daemon's fds
    are back to their baseline."""
    daemon = daemon_factory(public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("blocking_closes", runtime_dir=str(daemon.runtime_dir), sockets=MAX_PENDING_PER_UID + 2)
    victim.start()
    attacker.go()
    stuck = attacker.expect("refused", timeout_s=60)
    fds_stuck = daemon.fd_count()
    attacker.send("flood")
    attacker.expect("stuck", timeout_s=60)
    fds_after_flood = daemon.fd_count()
    time.sleep(1.0)  # the victim goes on while the closes hang
    served = victim.stop()
    attacker.send("release")
    result = attacker.result()
    print(
        f"while stuck: new session {stuck['new_session']}, daemon fds {fds_stuck} then {fds_after_flood} after "
        f"200 refused connections, victim {served}; after release: {result}"
    )
    assert stuck["hello"] == "HELLO"
    assert stuck["new_session"] == f"ERROR {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}", stuck
    assert fds_after_flood - fds_stuck < 10, "refused connections queued behind the hung close"
    assert result["after_release"] == "HELLO", result
    assert_served(served)
    assert_recovered(daemon, before)
