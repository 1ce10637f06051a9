"""Image pools and grants between clients, on real daemons."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

import dmabufd_client
from dmabufd_client import Access
from tests.conftest import ROOTLESS_UID, DaemonFactory, RunningDaemon, run_as_rootless_client


def test_pool_layout_follows_v4l2(client: dmabufd_client.Client) -> None:
    with client.allocate_pool("NV12", 640, 480, 4) as pool:
        assert (pool.fourcc, pool.width, pool.height) == ("NV12", 640, 480)
        assert pool.frame_bytes == 640 * 480 * 3 // 2
        assert [(p.buffer_index, p.offset, p.stride, p.size) for p in pool.planes] == [
            (0, 0, 640, 640 * 480),
            (0, 640 * 480, 640, 640 * 240),
        ]
        assert len(pool.frames) == 4
        assert all(len(frame) == 1 and frame[0].size >= pool.frame_bytes for frame in pool.frames)
        assert client.stats().total_buffers == 4, "a pool's buffers are booked like any"
    assert client.stats().total_buffers == 0


def test_buffer_per_plane(client: dmabufd_client.Client) -> None:
    with client.allocate_pool("NM12", 320, 240, 3, buffer_per_plane=True) as pool:
        assert [p.buffer_index for p in pool.planes] == [0, 1]
        for frame in pool.frames:
            assert [b.size for b in frame] == [77824, 40960]  # 320*240 and 320*120, rounded to pages


def test_stride_alignment(client: dmabufd_client.Client) -> None:
    with client.allocate_pool("YUYV", 100, 10, 1, stride_align=64) as pool:
        assert pool.planes[0].stride == 256  # 200 bytes rounded up to 64
        assert pool.frame_bytes == 2560


def test_recycling_gives_the_same_buffers_back(client: dmabufd_client.Client) -> None:
    first = client.allocate_pool("YUYV", 640, 480, 6, recycle=True)
    inodes = {b.info.inode for b in first.buffers}
    assert not first.recycled
    first.close()
    second = client.allocate_pool("YUYV", 640, 480, 6, recycle=True)
    assert second.recycled
    assert {b.info.inode for b in second.buffers} == inodes
    with second.frames[0][0].map(Access.WRITE) as mapping:
        mapping.memoryview[:4] = b"next"
    second.close()
    other_format = client.allocate_pool("YUYV", 320, 240, 6, recycle=True)
    assert not other_format.recycled
    other_format.close()


def test_a_pool_still_open_somewhere_is_not_recycled(client: dmabufd_client.Client) -> None:
    pool = client.allocate_pool("GREY", 64, 64, 2, recycle=True)
    kept = os.dup(pool.buffers[0].fileno())
    try:
        pool.close()
        again = client.allocate_pool("GREY", 64, 64, 2, recycle=True)
        assert not again.recycled, "this process still holds one of its buffers"
        again.close()
    finally:
        os.close(kept)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid")
def test_recycled_buffers_stay_with_their_uid(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(public=True)
    result = run_as_rootless_client(daemon, "c.allocate_pool('RGB3', 64, 64, 2, recycle=True).close()\n")
    assert result.returncode == 0, result.stderr
    with daemon.connect() as client, client.allocate_pool("RGB3", 64, 64, 2, recycle=True) as pool:
        assert not pool.recycled, "another uid's old frames are never handed to us"


@pytest.mark.parametrize(
    ("fourcc", "width", "height", "count", "message"),
    [
        ("NV12", 0, 480, 2, "width"),
        ("NV12", 640, 0, 2, "height"),
        ("NV12", 100000, 480, 2, "width"),
        ("ABCD", 640, 480, 2, "ABCD"),
        ("NV12", 640, 480, 0, "between 1 and 64"),
        ("NV12", 640, 480, 65, "between 1 and 64"),
    ],
)
def test_bad_pools(  # noqa: PLR0917 - pytest passes parameters positionally
    client: dmabufd_client.Client, fourcc: str, width: int, height: int, count: int, message: str
) -> None:
    with pytest.raises(dmabufd_client.InvalidArgument, match=message):
        client.allocate_pool(fourcc, width, height, count)
    assert client.stats().total_buffers == 0


def test_pool_over_quota(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory('[quota.default]\nmax_bytes = "2M"\n')
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.ResourceExhausted):
            client.allocate_pool("XR24", 640, 480, 4)  # 4 x 1.2 MB
        assert client.stats().total_buffers == 0


def test_token_grant_shares_bytes_once(daemon: RunningDaemon) -> None:
    with daemon.connect() as producer, daemon.connect() as consumer:
        pool = producer.allocate_pool("GREY", 64, 64, 2)
        with pool.frames[1][0].map(Access.WRITE) as mapping:
            mapping.memoryview[:5] = b"frame"
        grant = producer.grant(pool)
        with consumer.redeem(grant.token) as received:
            assert received.pool is not None
            assert received.pool.id == pool.id
            with received.pool.frames[1][0].map(Access.READ) as mapping:
                assert bytes(mapping.memoryview[:5]) == b"frame"
        with pytest.raises(dmabufd_client.NotFound):
            consumer.redeem(grant.token)  # replayed
        with pytest.raises(dmabufd_client.NotFound):
            consumer.redeem("ab" * 32)  # forged
        with pytest.raises(dmabufd_client.InvalidArgument):
            consumer.redeem("not hex")
        pool.close()


def test_grant_to_a_uid(daemon: RunningDaemon) -> None:
    with daemon.connect() as producer, daemon.connect() as consumer:
        buffer = producer.allocate(4096)
        grant = producer.grant([buffer], to_uid=os.getuid())
        offered, _ = consumer.grants()
        assert [g.id for g in offered] == [grant.id]
        assert grant.token == ""
        with consumer.redeem(grant_id=grant.id) as received:
            assert received.buffers[0].info.inode == buffer.info.inode
        buffer.close()


def test_grant_to_a_uid_with_no_client(client: dmabufd_client.Client) -> None:
    with (
        client.allocate(4096) as buffer,
        pytest.raises(dmabufd_client.NotFound, match=f"no client of uid {ROOTLESS_UID}"),
    ):
        client.grant([buffer], to_uid=ROOTLESS_UID)


def test_revoked_and_orphaned_grants(daemon: RunningDaemon) -> None:
    with daemon.connect() as consumer:
        with daemon.connect() as producer:
            buffer = producer.allocate(4096)
            revoked = producer.grant([buffer])
            producer.revoke(revoked.id)
            with pytest.raises(dmabufd_client.NotFound):
                consumer.redeem(revoked.token)
            orphan = producer.grant([buffer])
            redeemed_then_revoked = producer.grant([buffer])
            kept = consumer.redeem(redeemed_then_revoked.token)
            with pytest.raises(dmabufd_client.NotFound):
                producer.revoke(redeemed_then_revoked.id)  # already redeemed: nothing to revoke
            buffer.close()
        # The owner's session ended: its grants went with it ...
        with pytest.raises(dmabufd_client.NotFound):
            consumer.redeem(orphan.token)
        # ... but fds already delivered stay valid.
        with kept, kept.buffers[0].map(Access.RW) as mapping:
            mapping.memoryview[0] = 7
            assert mapping.memoryview[0] == 7


def test_read_only_grant_of_memfd_buffers(daemon: RunningDaemon) -> None:
    with daemon.connect() as producer, daemon.connect() as consumer:
        buffer = producer.allocate(4096)
        with buffer.map(Access.WRITE) as mapping:  # a mapping made before the grant keeps working
            grant = producer.grant([buffer], read_only=True)
            mapping.memoryview[:2] = b"ok"
        with consumer.redeem(grant.token) as received:
            assert received.read_only
            fd = received.buffers[0].fileno()
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            with pytest.raises(PermissionError):
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(os.open(f"/proc/self/fd/{fd}", os.O_RDWR), b"x", 0)
            with received.buffers[0].map(Access.READ) as mapping:
                assert bytes(mapping.memoryview[:2]) == b"ok"
        with pytest.raises(PermissionError), buffer.map(Access.WRITE):
            pass  # sealed for everyone from the grant on, the owner too
        buffer.close()


def test_granted_pool_is_not_recycled_while_the_receiver_holds_it(daemon: RunningDaemon) -> None:
    with daemon.connect() as producer, daemon.connect() as consumer:
        pool = producer.allocate_pool("GREY", 32, 32, 2, recycle=True)
        received = consumer.redeem(producer.grant(pool).token)
        pool.close()
        again = producer.allocate_pool("GREY", 32, 32, 2, recycle=True)
        assert not again.recycled, "the consumer still holds the old frames"
        received.close()
        again.close()


def test_a_granted_pool_is_never_recycled(daemon: RunningDaemon) -> None:
    """A receiver may keep a mapping, or an fd in flight in a socket, that
    /proc does not show once it has closed its own fds: frames that went to
    a grant are freed, not handed to the owner's next pool."""
    with daemon.connect() as producer, daemon.connect() as consumer:
        pool = producer.allocate_pool("GREY", 32, 32, 2, recycle=True)
        inodes = {b.info.inode for b in pool.buffers}
        consumer.redeem(producer.grant(pool).token).close()
        pool.close()
        again = producer.allocate_pool("GREY", 32, 32, 2, recycle=True)
        assert not again.recycled
        assert not {b.info.inode for b in again.buffers} & inodes
        again.close()


def test_a_resealed_frame_is_never_recycled(client: dmabufd_client.Client) -> None:
    """Any holder of a read-write memfd fd can add seals; a frame that
    carries one it was not made with (here F_SEAL_FUTURE_WRITE: nobody may
    write it any more) must not come back in a pool."""
    pool = client.allocate_pool("GREY", 32, 32, 2, recycle=True)
    sealed = pool.buffers[0].info.inode
    fcntl.fcntl(pool.buffers[0].fileno(), fcntl.F_ADD_SEALS, 0x0010)  # F_SEAL_FUTURE_WRITE
    pool.close()
    again = client.allocate_pool("GREY", 32, 32, 2, recycle=True)
    assert sealed not in {b.info.inode for b in again.buffers}
    for buffer in again.buffers:
        with buffer.map(Access.WRITE) as mapping:
            mapping.memoryview[:5] = b"fresh"
    again.close()


def test_read_only_grant_of_a_buffer_whose_seals_are_sealed(client: dmabufd_client.Client) -> None:
    """A holder of the read-write fd added F_SEAL_SEAL: the daemon can no
    longer seal it read-only, and says so (FAILED_PRECONDITION), before
    sealing any buffer of the grant."""
    first, second = client.allocate(4096), client.allocate(4096)
    fcntl.fcntl(second.fileno(), fcntl.F_ADD_SEALS, 0x0001)  # F_SEAL_SEAL
    with pytest.raises(dmabufd_client.FailedPrecondition, match=f"buffer {second.id} can take no more seals"):
        client.grant([first, second], read_only=True)
    with first.map(Access.WRITE) as mapping:  # the grant sealed nothing
        mapping.memoryview[:2] = b"ok"
    assert client.grant([second]).id > 0  # read-write sharing still works
    first.close()
    second.close()


def test_a_token_grant_named_by_its_id_looks_like_no_grant(daemon: RunningDaemon) -> None:
    """Grant ids are counted: telling "exists, but not for you" from "no
    such grant" would let anyone learn who grants what. Both are NOT_FOUND
    with one message."""
    with daemon.connect() as producer, daemon.connect() as stranger:
        buffer = producer.allocate(4096)
        grant = producer.grant([buffer])
        with pytest.raises(dmabufd_client.NotFound) as by_id:
            stranger.redeem(grant_id=grant.id)
        with pytest.raises(dmabufd_client.NotFound) as unknown:
            stranger.redeem(grant_id=grant.id + 1000)
        assert by_id.value.message == unknown.value.message
        stranger.redeem(grant.token).close()  # the token still works
        buffer.close()
