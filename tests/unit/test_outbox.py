"""The outbox (the one way fds leave the daemon) and the buffer's references."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from dmabufd.errors import BufferNotFound, DeliveryFailed
from dmabufd.heaps.buffer import Buffer, BufferReleased
from dmabufd.heaps.memfd import MEMFD_SPEC, MemfdBackend
from dmabufd.transport.outbox import Outbox, Outgoing
from dmabufd_common import fdwire

BACKEND = MemfdBackend(MEMFD_SPEC)
SESSION_ID = 7
TICKET = b"t" * fdwire.TICKET_BYTES


def on_a_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (the outbox lives on one)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def new_buffer(entitled: bool = True) -> Buffer:
    buffer = Buffer(BACKEND.allocate(4096, "outbox-test"))
    if entitled:
        buffer.entitle(SESSION_ID)
    return buffer


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    daemon_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    daemon_end.setblocking(False)
    yield daemon_end, client_end
    client_end.close()


def make_outbox(sock: socket.socket, overflows: list[str], max_frames: int = 4) -> Outbox:
    return Outbox(
        sock,
        SESSION_ID,
        asyncio.get_running_loop(),
        max_frames=max_frames,
        stall_s=1.0,
        on_overflow=overflows.append,
        dispose=lambda sock: sock.close(),
    )


def deliver_from_a_thread(outbox: Outbox, ticket: bytes, items: list[Outgoing]) -> None:
    """Queue as a handler on an executor does: the write is left to the
    loop, which does not run until the test awaits."""
    thread = threading.Thread(target=outbox.deliver, args=(ticket, items))
    thread.start()
    thread.join()


def read_frame(sock: socket.socket) -> tuple[fdwire.Frame, list[int]]:
    data, fds, _ = fdwire.receive(sock)
    return fdwire.decode(data), fds


def test_a_buffer_is_freed_by_its_last_reference_only() -> None:
    buffer = new_buffer()
    buffer.get()
    buffer.put()
    assert buffer.allocation.fd >= 0
    buffer.put()
    assert buffer.allocation.fd == -1
    with pytest.raises(BufferReleased):
        buffer.get()
    with pytest.raises(BufferReleased):
        _ = buffer.fd


def test_revoked_buffer_entitles_nobody() -> None:
    buffer = new_buffer()
    assert buffer.entitles(SESSION_ID)
    buffer.revoke()
    buffer.entitle(SESSION_ID)
    assert not buffer.entitles(SESSION_ID), "entitling a revoked buffer does nothing"
    buffer.reinstate()
    buffer.entitle(SESSION_ID + 1)
    assert buffer.entitles(SESSION_ID + 1)
    assert not buffer.entitles(SESSION_ID)
    buffer.put()


@on_a_loop
async def test_delivery_reaches_the_client_and_holds_references_until_sent(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    daemon_end, client_end = pair
    outbox = make_outbox(daemon_end, [])
    buffer = new_buffer()
    deliver_from_a_thread(outbox, TICKET, [Outgoing(42, buffer)])
    buffer.put()  # the caller's reference; the outbox has its own
    assert buffer.allocation.fd >= 0
    await outbox.flushed(TICKET)
    assert buffer.allocation.fd == -1, "written: the outbox gave its reference back"
    frame, fds = read_frame(client_end)
    assert isinstance(frame, fdwire.FdBatch)
    assert frame.buffer_ids == (42,)
    assert len(fds) == 1
    assert os.fstat(fds[0]).st_size == 4096
    os.close(fds[0])
    outbox.close("test over")


@on_a_loop
async def test_a_buffer_released_before_it_is_written_is_never_sent(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    daemon_end, client_end = pair
    outbox = make_outbox(daemon_end, [])
    buffer = new_buffer()
    deliver_from_a_thread(outbox, TICKET, [Outgoing(1, buffer)])
    buffer.revoke()  # released by its owner while the frame was queued
    with pytest.raises(BufferNotFound, match="released before its fd could be sent"):
        await outbox.flushed(TICKET)
    client_end.setblocking(False)
    with pytest.raises(BlockingIOError):
        client_end.recv(64)
    buffer.put()
    assert buffer.allocation.fd == -1
    outbox.close("test over")


@on_a_loop
async def test_a_client_that_does_not_read_overflows_its_own_outbox(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    daemon_end, _client_end = pair
    daemon_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    overflows: list[str] = []
    outbox = make_outbox(daemon_end, overflows, max_frames=4)
    buffers = [new_buffer() for _ in range(64)]
    refused: list[DeliveryFailed] = []
    for index, buffer in enumerate(buffers):
        try:
            outbox.deliver(index.to_bytes(fdwire.TICKET_BYTES, "little"), [Outgoing(index, buffer)])
        except DeliveryFailed as error:
            refused.append(error)
            break
        await asyncio.sleep(0)  # let the loop write what the socket takes
    assert refused, "the backlog must run out before 64 unread frames"
    assert "frames left unread" in str(refused[0])
    assert overflows
    assert "limits.outbox_frames" in overflows[0]
    assert outbox.stalled_for(asyncio.get_running_loop().time() + 10) > 0, "frames are waiting"
    outbox.close("overflow")
    for buffer in buffers:
        buffer.put()
    assert all(buffer.allocation.fd == -1 for buffer in buffers), "close() dropped the queue's references"


@on_a_loop
async def test_close_fails_the_calls_still_waiting(pair: tuple[socket.socket, socket.socket]) -> None:
    daemon_end, _client_end = pair
    daemon_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outbox = make_outbox(daemon_end, [], max_frames=1000)
    buffers = [new_buffer() for _ in range(200)]
    for index, buffer in enumerate(buffers):
        outbox.deliver(TICKET if index == 199 else os.urandom(16), [Outgoing(index, buffer)])
    waiting = asyncio.ensure_future(outbox.flushed(TICKET))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the socket is full: the last frame waits"
    outbox.close("client stalled")
    with pytest.raises(DeliveryFailed, match="client stalled"):
        await waiting
    with pytest.raises(DeliveryFailed, match="closed"):
        outbox.deliver(TICKET, [Outgoing(0, buffers[0])])
    for buffer in buffers:
        buffer.put()


def reply_with(outbox: Outbox, ticket: bytes, buffer: Buffer, buffer_id: int) -> None:
    """Answer an ALLOCATE as the daemon does: park, deliver, reply."""
    outbox.park(ticket)
    outbox.deliver(ticket, [Outgoing(buffer_id, buffer)])
    outbox.reply(fdwire.Reply(ticket, 0, b"response"), fdwire.Reply(ticket, 5, b"released meanwhile"))


@on_a_loop
async def test_a_reply_with_nothing_ahead_of_it_is_written_at_once_with_its_fd(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    daemon_end, client_end = pair
    outbox = make_outbox(daemon_end, [])
    buffer = new_buffer()
    reply_with(outbox, TICKET, buffer, 9)
    assert outbox.stalled_for(asyncio.get_running_loop().time() + 10) == 0, "nothing was queued"
    buffer.put()
    assert buffer.allocation.fd == -1, "written: no reference of the outbox's is left"
    client_end.setblocking(False)
    frame, fds = read_frame(client_end)  # written before the loop ran again
    assert frame == fdwire.Reply(TICKET, 0, b"response")
    assert len(fds) == 1
    assert os.fstat(fds[0]).st_size == 4096
    os.close(fds[0])
    outbox.close("test over")


@on_a_loop
async def test_a_reply_whose_buffer_was_released_goes_as_its_stand_in_without_fds(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    daemon_end, client_end = pair
    outbox = make_outbox(daemon_end, [])
    buffer = new_buffer()
    outbox.park(TICKET)
    outbox.deliver(TICKET, [Outgoing(3, buffer)])
    buffer.revoke()  # a Release that guessed the new id, between the handler and its REPLY
    outbox.reply(fdwire.Reply(TICKET, 0, b"response"), fdwire.Reply(TICKET, 5, b"released meanwhile"))
    frame, fds = read_frame(client_end)
    assert frame == fdwire.Reply(TICKET, 5, b"released meanwhile")
    assert fds == []
    buffer.put()
    assert buffer.allocation.fd == -1
    outbox.close("test over")


@on_a_loop
async def test_a_reply_on_a_full_socket_waits_in_the_queue_behind_the_frames_before_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    daemon_end, client_end = pair
    daemon_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outbox = make_outbox(daemon_end, [], max_frames=1000)
    buffers = [new_buffer() for _ in range(41)]
    sent = 0
    while outbox.stalled_for(asyncio.get_running_loop().time() + 10) == 0:
        assert sent < 40, "a 4 KiB socket buffer fills before 40 REPLYs"
        reply_with(outbox, sent.to_bytes(fdwire.TICKET_BYTES, "little"), buffers[sent], sent)
        sent += 1
    last = sent.to_bytes(fdwire.TICKET_BYTES, "little")
    reply_with(outbox, last, buffers[sent], sent)  # queued behind the one that did not fit
    received: list[bytes] = []
    while len(received) <= sent:
        await asyncio.sleep(0.01)  # the loop writes as the client reads
        client_end.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                frame, fds = read_frame(client_end)
                assert isinstance(frame, fdwire.Reply)
                assert len(fds) == 1
                os.close(fds[0])
                received.append(frame.ticket)
    assert received == [index.to_bytes(fdwire.TICKET_BYTES, "little") for index in range(sent + 1)], "in order"
    outbox.close("test over")
    for buffer in buffers:
        buffer.put()
    assert all(buffer.allocation.fd == -1 for buffer in buffers)


@on_a_loop
async def test_a_call_that_is_over_leaves_nothing_behind_when_its_frame_is_dropped(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A call that failed or was cancelled (a client's deadline) while its
    frame was still queued, whose buffer is then released, so the frame is
    dropped: nobody will ask why, so the reason is not kept (a client could
    repeat this for as long as its session lives)."""
    daemon_end, _client_end = pair
    outbox = make_outbox(daemon_end, [], max_frames=64)
    buffer = new_buffer()
    deliver_from_a_thread(outbox, TICKET, [Outgoing(1, buffer)])
    outbox.forget(TICKET)  # the handler's call ended before its frame went out
    buffer.revoke()
    await asyncio.sleep(0)  # the loop drops the frame
    assert outbox._failed == {}
    assert outbox._abandoned == set()
    buffer.put()
    outbox.close("test over")


@on_a_loop
async def test_a_wait_for_a_frame_that_is_cancelled_leaves_nothing_behind(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    daemon_end, client_end = pair
    daemon_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    with contextlib.suppress(BlockingIOError):  # fill the socket: frames queue
        while True:
            daemon_end.send(b"x" * 512)
    outbox = make_outbox(daemon_end, [], max_frames=64)
    buffer = new_buffer()
    outbox.deliver(TICKET, [Outgoing(1, buffer)])
    waiting = asyncio.create_task(outbox.flushed(TICKET))
    await asyncio.sleep(0)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    buffer.revoke()
    client_end.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            client_end.recv(4096)
    for _ in range(10):  # the writer callback runs once the socket drains
        await asyncio.sleep(0.01)
    assert outbox._queue == collections.deque()
    assert outbox._failed == {}
    assert outbox._abandoned == set()
    buffer.put()
    outbox.close("test over")
