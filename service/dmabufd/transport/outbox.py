"""The outbox: the one way fds leave the daemon.

Every fd a client receives (allocations, loads, models, pools, redeemed
grants) goes through Outbox.deliver() and is written by Outbox._send(),
and nowhere else: from _flush(), or for a REPLY with nothing queued ahead
of it, from _write_now(). At the moment of writing, both check that the
session is still open and that each buffer still entitles this session
(see heaps/buffer.py): a buffer released, revoked or handed to someone
else in the meantime is never sent.

Lifetime: an Outbox owns the daemon's end of one session's fd socket from
accept to close(), which hands it to the closer; only the event loop
touches the socket, so no thread can write to a socket number that was
closed and reused. A queued frame owns a
reference on each buffer it carries (taken by deliver(), given back when
the frame is written or dropped), so the fds it names stay open until the
kernel has them.

Bounds: a client that lets `max_frames` frames queue up, or leaves one
unread for `stall_s` seconds, loses its session (the fd server ends it);
nothing it does makes another client wait, and no daemon thread ever
blocks on its socket (it is non-blocking; a full socket arms a writer
callback instead).

Threads: deliver(), control(), park(), reply() and forget() may be called
from any thread;
_flush(), _write_now(), flushed(), stalled_for() and close() run on the
event loop.
_lock guards the queue, the per-ticket counts and the closed state; it is
a leaf lock, never held across a syscall.
"""

from __future__ import annotations

import array
import asyncio
import collections
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dmabufd.errors import BufferNotFound, DeliveryFailed, DmabufdError
from dmabufd.heaps.buffer import Buffer
from dmabufd_common import fdwire

log = logging.getLogger(__name__)

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


@dataclass(frozen=True)
class Outgoing:
    """One buffer to send: its id for the client, and which fd of it."""

    buffer_id: int
    buffer: Buffer
    read_only: bool = False


@dataclass
class _Frame:
    data: bytes
    items: list[Outgoing]  # each holds a reference of this frame's
    ticket: bytes | None
    queued_at: float
    # A REPLY's stand-in, sent without fds if its own fds may not go out
    # (encoded only then: nearly every REPLY goes out as it is).
    fallback: fdwire.Reply | None = None


class Outbox:
    def __init__(
        self,
        sock: socket.socket,
        session_id: int,
        loop: asyncio.AbstractEventLoop,
        *,
        max_frames: int,
        stall_s: float,
        on_overflow: Callable[[str], None],
        dispose: Callable[[socket.socket], None],
    ) -> None:
        """dispose(socket) takes the socket at close(), to close it without
        ever blocking the loop."""
        self.session_id = session_id
        self._dispose = dispose
        self._sock = sock
        self._loop = loop
        self._max_frames = max_frames
        self._stall_s = stall_s
        self._on_overflow = on_overflow
        self._lock = threading.Lock()
        self._queue: collections.deque[_Frame] = collections.deque()
        self._pending: dict[bytes, int] = {}  # ticket -> frames not written yet
        self._failed: dict[bytes, DmabufdError] = {}  # ticket -> why its frames were dropped
        # Tickets with frames queued whose call is over (forget): their
        # failures are dropped with their last frame, not kept for a waiter.
        self._abandoned: set[bytes] = set()
        # ticket of an ALLOCATE frame -> the buffers its REPLY will carry
        # (each holds a reference of the outbox's until the REPLY is queued).
        self._parked: dict[bytes, list[Outgoing]] = {}
        self._closed: str | None = None
        # Loop only: calls waiting for their ticket's frames to be written.
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._writing = False
        self._loop_thread = threading.get_ident()  # an Outbox is made on the loop

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def socket(self) -> socket.socket:
        """For the fd server to read from (loop only)."""
        return self._sock

    # -- any thread ------------------------------------------------------

    def deliver(self, ticket: bytes, items: Sequence[Outgoing]) -> None:
        """Queue `items` for the client, tagged with the call's ticket. The
        outbox takes its own reference on each buffer; the caller keeps
        its own. Raises DeliveryFailed if the session is closed or would
        pass its backlog (the session is then ended). For a parked ticket
        the items wait for its REPLY instead (park)."""
        with self._lock:
            parked = self._parked.get(ticket)
            if parked is not None:
                if self._closed is not None:
                    raise DeliveryFailed(f"the client's fd socket is closed ({self._closed})")
                for item in items:
                    item.buffer.get()
                parked.extend(items)
                return
        ids = [item.buffer_id for item in items]
        frames = [
            (fdwire.encode(batch), list(items[batch.first_index : batch.first_index + len(batch.buffer_ids)]))
            for batch in fdwire.batches(ticket, ids)
        ]
        self._queue_frames(ticket, frames)

    def control(self, frame: fdwire.Hello | fdwire.ErrorFrame) -> None:
        """Queue a frame without fds (HELLO, ERROR)."""
        self._queue_frames(None, [(fdwire.encode(frame), [])])

    def park(self, ticket: bytes) -> None:
        """What deliver() gets for `ticket` from now on goes out with the
        REPLY that answers it (reply()), as one message: an ALLOCATE is
        answered by one sendmsg, not an FDS frame and then a REPLY."""
        with self._lock:
            self._parked.setdefault(ticket, [])

    def reply(self, reply: fdwire.Reply, undeliverable: fdwire.Reply) -> None:
        """Queue the REPLY of a parked ticket: with the buffers delivered
        for it when it reports success, else alone (the buffers are let go).
        If, when it is written, one of its buffers no longer entitles the
        session, `undeliverable` (a failure, no fds) goes instead."""
        with self._lock:
            parked = self._parked.pop(reply.ticket, [])
            # Nothing is queued ahead of it and we are on the loop: written
            # right here, without a trip through the queue (an ALLOCATE's
            # REPLY, nearly always).
            at_once = not self._queue and self._closed is None and threading.get_ident() == self._loop_thread
        carried = parked if reply.code == 0 else []
        try:
            if not (at_once and self._write_now(reply, carried, undeliverable)):
                self._enqueue(None, [_Frame(fdwire.encode(reply), carried, None, 0.0, undeliverable)])
        finally:
            for item in parked:  # the park's references; a queued frame holds its own
                item.buffer.put()

    def _write_now(self, reply: fdwire.Reply, items: list[Outgoing], undeliverable: fdwire.Reply) -> bool:
        """Write a REPLY with _flush's checks (loop only); False if the
        socket is full, for the caller to queue it instead."""
        if self._unentitled(items) is None:
            data = fdwire.encode(reply)
        else:
            data, items = fdwire.encode(undeliverable), []
        try:
            self._send(data, items)
        except BlockingIOError:
            return False
        except OSError as error:
            self._on_overflow(f"sending on its fd socket failed: {error.strerror or error}")
        return True

    def _queue_frames(self, ticket: bytes | None, frames: list[tuple[bytes, list[Outgoing]]]) -> None:
        if not frames:  # a delivery of no buffers (a model of zero-size tensors)
            return
        self._enqueue(ticket, [_Frame(data, items, ticket, 0.0) for data, items in frames])

    def _enqueue(self, ticket: bytes | None, frames: list[_Frame]) -> None:
        """Queue frames, each taking its own reference on its buffers."""
        overflow = None
        with self._lock:
            if self._closed is not None:
                raise DeliveryFailed(f"the client's fd socket is closed ({self._closed})")
            if len(self._queue) + len(frames) > self._max_frames:
                overflow = f"more than {self._max_frames} frames left unread on its fd socket (limits.outbox_frames)"
            else:
                now = time.monotonic()
                for frame in frames:
                    for item in frame.items:
                        item.buffer.get()
                    frame.queued_at = now
                    self._queue.append(frame)
                if ticket is not None:
                    self._pending[ticket] = self._pending.get(ticket, 0) + len(frames)
        if overflow is not None:
            self._on_overflow(overflow)
            raise DeliveryFailed(f"session ended: {overflow}")
        if threading.get_ident() == self._loop_thread:
            self._flush()
        else:
            self._loop.call_soon_threadsafe(self._flush)

    def forget(self, ticket: bytes) -> None:
        """The call that used `ticket` is over: drop what it left behind,
        and what its frames still queued will leave (nobody waits for
        them any more)."""
        with self._lock:
            self._failed.pop(ticket, None)
            if ticket in self._pending:
                self._abandoned.add(ticket)

    # -- event loop ------------------------------------------------------

    def _flush(self) -> None:
        while True:
            with self._lock:
                if self._closed is not None or not self._queue:
                    break
                frame = self._queue[0]
            problem = self._undeliverable(frame)
            if problem is not None and frame.fallback is not None:
                for item in frame.items:
                    item.buffer.put()
                frame.items, frame.data, frame.fallback, problem = [], fdwire.encode(frame.fallback), None, None
            if problem is None:
                try:
                    self._send(frame.data, frame.items)
                except BlockingIOError:
                    self._arm_writer(True)
                    return
                except OSError as error:
                    self._on_overflow(f"sending on its fd socket failed: {error.strerror or error}")
                    return
            with self._lock:
                self._queue.popleft()
                if problem is not None and frame.ticket is not None:
                    self._failed.setdefault(frame.ticket, problem)
                done = self._done_one(frame.ticket)
                if done is not None and done in self._abandoned:
                    self._abandoned.discard(done)
                    self._failed.pop(done, None)
                    done = None
            for item in frame.items:
                item.buffer.put()
            if done is not None:
                self._wake(done)
        self._arm_writer(False)

    def _undeliverable(self, frame: _Frame) -> DmabufdError | None:
        with self._lock:
            failed = frame.ticket is not None and frame.ticket in self._failed
        if failed:
            return BufferNotFound("an earlier part of this delivery was refused")
        return self._unentitled(frame.items)

    def _unentitled(self, items: list[Outgoing]) -> DmabufdError | None:
        for item in items:
            if not item.buffer.entitles(self.session_id):
                return BufferNotFound(f"buffer {item.buffer_id} was released before its fd could be sent")
        return None

    def _send(self, data: bytes, items: list[Outgoing]) -> None:
        fds = array.array("i", (item.buffer.fd_for(item.read_only) for item in items))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if fds else []
        self._sock.sendmsg([data], ancillary, _SEND_FLAGS)

    def _done_one(self, ticket: bytes | None) -> bytes | None:
        """Count one frame of `ticket` written or dropped (caller holds
        _lock); returns the ticket when it has no frame left."""
        if ticket is None:
            return None
        left = self._pending[ticket] - 1
        if left:
            self._pending[ticket] = left
            return None
        del self._pending[ticket]
        return ticket

    def _wake(self, ticket: bytes) -> None:
        waiter = self._waiters.pop(ticket, None)
        if waiter is None or waiter.done():
            return
        with self._lock:
            problem = self._failed.pop(ticket, None)
        if problem is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(problem)

    def _arm_writer(self, on: bool) -> None:
        if on == self._writing or self._closed is not None:
            return
        self._writing = on
        if on:
            self._loop.add_writer(self._sock.fileno(), self._flush)
        else:
            self._loop.remove_writer(self._sock.fileno())

    async def flushed(self, ticket: bytes) -> None:
        """Wait until every frame of `ticket` is written: a call answers
        only once its fds are on the client's socket. Raises the reason
        they were not (session ended, buffer released meanwhile)."""
        with self._lock:
            pending = ticket in self._pending
            problem = None if pending else self._failed.pop(ticket, None)
        if problem is not None:
            raise problem
        if not pending:
            return
        waiter = self._loop.create_future()
        self._waiters[ticket] = waiter
        written = False
        try:
            # The stall check ends the session well before this runs out.
            await asyncio.wait_for(waiter, timeout=2 * self._stall_s + 1)
            written = True
        finally:
            self._waiters.pop(ticket, None)
            if not written:  # cancelled (the client went away), timed out, or failed
                self.forget(ticket)

    def stalled_for(self, now: float) -> float:
        """How long the oldest unwritten frame has waited (0 if none)."""
        with self._lock:
            return now - self._queue[0].queued_at if self._queue else 0.0

    @property
    def stall_limit_s(self) -> float:
        return self._stall_s

    def close(self, reason: str) -> None:
        """End of the session: write what the socket still takes (the ERROR
        frames that explain the end, say), close it, drop the rest."""
        self._flush()
        with self._lock:
            if self._closed is not None:
                return
            self._closed = reason
            dropped = list(self._queue)
            self._queue.clear()
            dropped += [_Frame(b"", items, None, 0.0) for items in self._parked.values()]
            self._parked.clear()
            failure = DeliveryFailed(f"the session ended before its fds were sent ({reason})")
            for ticket in self._pending.keys() - self._abandoned:
                self._failed[ticket] = failure
            self._pending.clear()
            self._abandoned.clear()
        if self._writing:
            self._loop.remove_writer(self._sock.fileno())
            self._writing = False
        # Closing the socket drops the files still queued in it, whose last
        # close can block: the closer sees to it (transport/closer.py).
        self._dispose(self._sock)
        for frame in dropped:
            for item in frame.items:
                item.buffer.put()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(failure)
        self._waiters.clear()
        if dropped:
            log.debug("session %d: %d unsent frame(s) dropped", self.session_id, len(dropped))
