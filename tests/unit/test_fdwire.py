from __future__ import annotations

import os
import socket

import pytest

from dmabufd_common import fdwire


def test_roundtrip_every_frame() -> None:
    frames: list[fdwire.Frame] = [
        fdwire.Hello(7, b"t" * 32, 100, 1000, 1000),
        fdwire.Ticket(b"k" * 16),
        fdwire.FdBatch(b"k" * 16, 253, 300, (1, 2, 3)),
        fdwire.ErrorFrame(3, "bad thing: ü"),
        fdwire.AllocateFrame(b"k" * 16, b"\x08\x80\x20"),
        fdwire.AllocateFrame(b"k" * 16, b""),
        fdwire.Reply(b"k" * 16, 0, b"response"),
        fdwire.Reply(b"k" * 16, 8, b""),
    ]
    for frame in frames:
        assert fdwire.decode(fdwire.encode(frame)) == frame


def test_batches_split_at_scm_max_fd() -> None:
    batches = fdwire.batches(b"k" * 16, list(range(600)))
    assert [len(b.buffer_ids) for b in batches] == [253, 253, 94]
    assert [b.first_index for b in batches] == [0, 253, 506]
    assert {b.total for b in batches} == {600}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than"),
        (b"XXXX\x01\x02\x00\x00" + bytes(16), "bad magic"),
        (b"DBFD\x09\x02\x00\x00" + bytes(16), "version 9"),
        (b"DBFD\x01\x63\x00\x00", "unknown frame type 99"),
        (b"DBFD\x01\x02\x00\x00" + bytes(15), "carries 16 bytes"),
        (b"DBFD\x01\x01\x00\x00" + bytes(5), "truncated HELLO"),
        (b"DBFD\x01\x03\x00\x00" + bytes(24) + bytes(5), "whole number"),
        (b"DBFD" + bytes(5000), "exceeds"),
        (b"DBFD\x01\x06\x00\x00" + bytes(15), "16-byte ticket"),
        (b"DBFD\x01\x07\x00\x00" + bytes(19), "truncated REPLY"),
    ],
)
def test_decode_rejects_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(fdwire.FrameError, match=reason):
        fdwire.decode(data)


def test_too_many_fds_for_one_frame() -> None:
    with pytest.raises(fdwire.FrameError, match="253"):
        fdwire.encode(fdwire.FdBatch(b"k" * 16, 0, 254, tuple(range(254))))


def test_the_largest_allocate_and_reply_are_the_largest_frame() -> None:
    request = fdwire.encode(fdwire.AllocateFrame(b"k" * 16, bytes(fdwire.MAX_REQUEST_BYTES)))
    reply = fdwire.encode(fdwire.Reply(b"k" * 16, 0, bytes(fdwire.MAX_REPLY_BODY_BYTES)))
    assert len(request) == len(reply) == fdwire.MAX_FRAME_BYTES == 2056
    with pytest.raises(fdwire.FrameError, match="at most 2032"):
        fdwire.encode(fdwire.AllocateFrame(b"k" * 16, bytes(fdwire.MAX_REQUEST_BYTES + 1)))
    with pytest.raises(fdwire.FrameError, match="at most 2028"):
        fdwire.encode(fdwire.Reply(b"k" * 16, 0, bytes(fdwire.MAX_REPLY_BODY_BYTES + 1)))


def test_receive_marks_fds_close_on_exec() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe2(0)  # not close-on-exec at the sender
    try:
        socket.send_fds(left, [b"frame"], [read_end])
        data, fds, flags = fdwire.receive(right)
        assert data == b"frame"
        assert not flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
        (received,) = fds
        assert not os.get_inheritable(received)
        os.close(received)
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        left.close()
        right.close()
