"""Aliasing: a grant, a pool or the warm cache keeps naming a buffer after
it was released, and the name then reaches memory that is now someone
else's (or a closed fd, or an fd number reused for another file)."""

from __future__ import annotations

from dmabufd_client import Access
from tests.conftest import DaemonFactory, RunningDaemon
from tests.security.conftest import (
    Spawn,
    VictimOf,
    assert_recovered,
    assert_served,
    fd_links,
    footprint,
)

POOL = ("GREY", 64, 64, 4)  # fourcc, width, height, frames


def test_old_token_of_a_recycled_pool(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: root grants a recycled pool by token, releases the pool, and
    allocates an identical pool, which reuses the warm frames; uid 12345
    then redeems the OLD token.
    Defence: NOT_FOUND: the token died with its pool, and the receiver
    never gets the new pool's buffers."""
    daemon = daemon_factory(public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("redeem", runtime_dir=str(daemon.runtime_dir))
    victim.start()
    attacker.go()
    with daemon.connect() as owner:
        pool = owner.allocate_pool(*POOL, recycle=True, name="aliasa")
        token = owner.grant(pool).token
        pool.close()
        new = owner.allocate_pool(*POOL, recycle=True, name="aliasa")
        for buffer in new.buffers:
            with buffer.map(Access.WRITE) as mapping:
                mapping.memoryview[:8] = b"NEW POOL"
        attacker.send("redeem", token=token)
        result = attacker.result()
        new_inodes = {buffer.info.inode for buffer in new.buffers}
        print(f"new pool recycled the old frames: {new.recycled}; old token redeemed: {result['status']}")
        assert not set(result.get("inodes", [])) & new_inodes, "the old token handed out the new pool's buffers"
        assert result["status"] == "NOT_FOUND", result
        new.close()
    served = victim.stop()
    assert_served(served)
    assert_recovered(daemon, before, kept=lambda: warm_fds(daemon, ":aliasa"))


def test_token_of_a_released_buffer(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: root grants a buffer by token and releases the buffer; uid
    12345 redeems the token (the daemon's fd for it is closed, or reused).
    Defence: NOT_FOUND."""
    daemon = daemon_factory(public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("redeem", runtime_dir=str(daemon.runtime_dir))
    victim.start()
    attacker.go()
    with daemon.connect() as owner:
        buffer = owner.allocate("4K")
        token = owner.grant([buffer]).token
        buffer.close()
        attacker.send("redeem", token=token)
        result = attacker.result()
    served = victim.stop()
    assert result["status"] == "NOT_FOUND", result
    assert_served(served)
    assert_recovered(daemon, before)


def warm_fds(daemon: RunningDaemon, label: str = ":aliasc") -> int:
    """The daemon's fds of memfds named `label` (their kernel name is
    "<pid>:<label>"): buffers it keeps warm for recycling."""
    return sum(1 for link in fd_links(daemon.pid) if link.startswith("/memfd:") and label in link)


def test_releasing_one_buffer_of_a_pool(daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf) -> None:
    """Attack: uid 12345 allocates a recycled pool, releases ONE of its
    buffers with Release (as if it were a lone buffer), then ends its
    session with the pool still held, so the pool goes to the warm cache.
    Defence: the Release is FAILED_PRECONDITION (release the pool); the
    next session of the same uid gets a recycled pool of the same format
    whose every frame maps, writes and reads back (no closed or reused fd
    in the warm cache); the daemon's fds are back to the baseline but for
    the frames it keeps warm."""
    daemon = daemon_factory(public=True)
    before = footprint(daemon)
    fourcc, width, height, count = POOL
    pool = {"runtime_dir": str(daemon.runtime_dir), "fourcc": fourcc, "width": width, "height": height, "count": count}
    victim = victim_of(daemon)
    breaker = spawn("pool_partial_release", **pool)
    user = spawn("pool_frames", **pool)
    victim.start()
    first = breaker.go().result()
    second = user.go().result()
    served = victim.stop()
    print(f"Release of one pool buffer: {first['release']['status']}; next pool: {second}")
    assert first["release"]["status"] == "FAILED_PRECONDITION", first["release"]
    assert second["allocate"] == "OK", second
    assert second["frames_ok"] == second["frames"] == count, second
    assert warm_fds(daemon) <= count
    assert_served(served)
    assert_recovered(daemon, before, kept=lambda: warm_fds(daemon))


def test_grant_receiver_keeps_a_mapping_of_a_recycled_pool(
    daemon_factory: DaemonFactory, spawn: Spawn, victim_of: VictimOf
) -> None:
    """Attack: root grants a recycled pool by token; uid 12345 redeems it,
    maps every frame read-write and closes the fds (a mapping shows in no
    fd table). Root releases the pool and allocates an identical one.
    Defence: the released frames are never recycled (they went to a grant
    receiver), so the new pool is fresh memory: the receiver's mappings
    see none of what root writes into it, and root's frames keep their
    bytes when the receiver writes through its mappings."""
    daemon = daemon_factory(public=True)
    before = footprint(daemon)
    victim = victim_of(daemon)
    attacker = spawn("mapped_receiver", runtime_dir=str(daemon.runtime_dir))
    victim.start()
    attacker.go()
    with daemon.connect() as owner:
        pool = owner.allocate_pool(*POOL, recycle=True, name="aliasd")
        attacker.send("redeem", token=owner.grant(pool).token)
        mapped = attacker.expect("mapped")
        pool.close()
        new = owner.allocate_pool(*POOL, recycle=True, name="aliasd")
        secret = b"ROOT SECRET 0123"
        for buffer in new.buffers:
            with buffer.map(Access.WRITE) as mapping:
                mapping.memoryview[: len(secret)] = secret
        attacker.send("peek")
        result = attacker.result()
        print(f"new pool recycled: {new.recycled}; the receiver's mappings read {result['heads']}")
        assert not new.recycled
        assert not {buffer.info.inode for buffer in new.buffers} & set(mapped["inodes"])
        assert secret.hex() not in result["heads"]
        for buffer in new.buffers:
            with buffer.map(Access.READ) as mapping:
                assert bytes(mapping.memoryview[: len(secret)]) == secret
        new.close()
    served = victim.stop()
    assert_served(served)
    assert_recovered(daemon, before, kept=lambda: warm_fds(daemon, ":aliasd"))
