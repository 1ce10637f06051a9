"""The client's end of the fd socket.

The daemon sends a HELLO frame on connect (the session token), then, for
every call that creates buffers, FDS frames tagged with that call's ticket
before the call returns. Several threads may make calls at once: whoever
reads a frame for another call's ticket files it under that ticket, so
every caller ends up with exactly its own fds.

Tickets go out ahead of the calls that name them, TICKET_BURST at a time:
the daemon has read a call's ticket long before the call reaches it (so the
call never waits for it), reads a burst in one wake-up, and most calls send
nothing at all. A spare older than SPARE_MAX_AGE_S is never used: the
daemon expires tickets 60 s after they arrive (fd-protocol.md 3.4), and a
client may sit idle for longer than that.

The socket is non-blocking: a send or a read that can go ahead at once (as
reading a call's fds after its response always can) costs one system call,
not a poll() first; poll() with the channel's timeout runs only when the
socket is not ready. The exception is a frame that answers one just sent (an
ALLOCATE frame's REPLY, the HELLO): it cannot be there yet, so its read
polls first rather than after a read that finds nothing.

Ownership: fds received here belong to the caller of take() from the
moment take() returns them; frames nobody claims (a failed call's) are
closed by discard().
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from dmabufd_client.errors import ProtocolError, Unavailable, from_status_value
from dmabufd_common import fdwire

# Tickets sent at once when none is left (the daemon allows 256 outstanding
# per session, and reads up to 16 frames of one session per wake-up).
TICKET_BURST = 16
# Spare tickets older than this are dropped unused: well inside the
# daemon's 60 s ticket lifetime, leaving a call up to 30 s (its timeout,
# a reconnect) to get from taking its ticket to the daemon claiming it.
SPARE_MAX_AGE_S = 30.0
# A plain int: MsgFlag's | and & run enum code in Python, for every frame.
_TRUNCATED = int(socket.MSG_CTRUNC | socket.MSG_TRUNC)


class FdChannel:
    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(path))
        except OSError as error:
            self._sock.close()
            raise Unavailable(f"cannot reach dmabufd's fd socket {path}: {error.strerror or error}") from None
        self._sock.setblocking(False)
        self._timeout_ms = max(1, round(timeout_s * 1000))
        # One thread reads the socket at a time (_reading), without holding
        # _filing; it files each frame under its ticket and wakes the others.
        # Guarded by _filing: fds and REPLYs read for calls that have not
        # taken them yet, tickets of failed calls whose late frames are
        # dropped on sight, and whether a thread is reading.
        self._filing = threading.Condition(threading.Lock())
        self._filed: dict[bytes, list[tuple[int, int]]] = {}
        self._replies: dict[bytes, tuple[fdwire.Reply, list[int]]] = {}
        self._abandoned: set[bytes] = set()
        self._reading = False
        frame, _ = self._read_frame(answer_pending=True)  # HELLO and ERROR carry no fds
        if isinstance(frame, fdwire.ErrorFrame):
            self.close()
            raise from_status_value(frame.code, frame.message)
        if not isinstance(frame, fdwire.Hello):
            self.close()
            raise ProtocolError(f"expected HELLO from dmabufd, got {type(frame).__name__}")
        self.hello = frame
        self.token_hex = frame.token.hex()
        self._spares_lock = threading.Lock()  # guards _spares and _spares_sent
        self._spares: collections.deque[bytes] = collections.deque()
        self._spares_sent = 0.0  # time.monotonic() when the spares went out

    def new_ticket(self, file_fd: int | None = None) -> bytes:
        """A ticket for the next call to name in its metadata: a spare sent
        ahead if a fresh enough one is left, else the first of a new burst
        (always a ticket of its own, sent now, when it carries a file)."""
        if file_fd is not None:
            ticket = os.urandom(fdwire.TICKET_BYTES)
            self._send(fdwire.encode(fdwire.FileTicket(ticket)), [file_fd])
            return ticket
        with self._spares_lock:
            if self._spares and time.monotonic() - self._spares_sent > SPARE_MAX_AGE_S:
                # Spares the daemon may expire before the call that takes one reaches it.
                self._spares.clear()
            if not self._spares:
                self._send_burst()
            return self._spares.popleft()

    def _send_burst(self) -> None:
        """Send TICKET_BURST tickets, keeping those that went out (caller
        holds _spares_lock). The first may wait for room in the socket
        within the timeout; the rest are sent only while there is room."""
        randomness = os.urandom(fdwire.TICKET_BYTES * TICKET_BURST)
        self._spares_sent = time.monotonic()
        for index in range(TICKET_BURST):
            ticket = randomness[index * fdwire.TICKET_BYTES : (index + 1) * fdwire.TICKET_BYTES]
            frame = fdwire.encode(fdwire.Ticket(ticket))
            if index == 0:
                self._send(frame, [])
            else:
                try:
                    self._sock.send(frame)
                except OSError:
                    return  # full (the rest can wait), or gone (the call reports it)
            self._spares.append(ticket)

    def _send(self, frame: bytes, fds: list[int]) -> None:
        """Send one frame, waiting up to the timeout for room."""
        try:
            while True:
                try:
                    if fds:
                        socket.send_fds(self._sock, [frame], fds)
                    else:
                        self._sock.send(frame)
                    return
                except BlockingIOError:
                    if not self._wait(select.POLLOUT):
                        raise Unavailable("dmabufd has not read its fd socket within the timeout") from None
        except OSError as error:
            raise Unavailable(f"dmabufd's fd socket is gone: {error.strerror or error}") from None

    def _wait(self, events: int) -> bool:
        """Wait until the socket is ready for `events` (or has failed);
        False on timeout."""
        fd = self._sock.fileno()
        if fd < 0:  # closed by another thread: fail as a blocking call on it would
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        poller = select.poll()
        poller.register(fd, events)
        return bool(poller.poll(self._timeout_ms))

    def _receive(self, answer_pending: bool) -> tuple[bytes, list[int], int]:
        """One message. `answer_pending`: the frame awaited answers one just
        sent, which the daemon cannot have answered yet, so wait for it
        before reading instead of after a read that finds nothing."""
        if answer_pending and not self._wait(select.POLLIN):
            raise TimeoutError
        while True:
            try:
                return fdwire.receive(self._sock)
            except BlockingIOError:
                if not self._wait(select.POLLIN):
                    raise TimeoutError from None

    def _read_frame(self, answer_pending: bool) -> tuple[fdwire.Frame, list[int]]:
        try:
            data, fds, flags = self._receive(answer_pending)
        except TimeoutError:
            raise Unavailable("timed out waiting for fds from dmabufd") from None
        except OSError as error:
            raise Unavailable(f"dmabufd's fd socket failed: {error.strerror or error}") from None
        if not data and not fds:
            raise Unavailable("dmabufd closed the fd socket (daemon stopped, or this session was ended)")
        if flags & _TRUNCATED:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("a frame from dmabufd was truncated")
        try:
            return fdwire.decode(data), fds
        except fdwire.FrameError as error:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"bad frame from dmabufd: {error}") from None

    def take(self, ticket: bytes, count: int) -> list[tuple[int, int]]:
        """The (buffer id, fd) pairs of the call that used `ticket`, in order.
        The daemon sent them before it answered the call, so they are
        already queued; reading never waits for the daemon to act."""
        with self._filing:
            self._read_until(lambda: len(self._filed.get(ticket, ())) >= count, answer_pending=False)
            return self._filed.pop(ticket, [])

    def allocate(self, request: bytes) -> tuple[fdwire.Reply, list[int]]:
        """Send an ALLOCATE frame (a serialized AllocateRequest of one
        buffer) and wait for its REPLY: (the reply, the fds it carries, one
        per buffer of its AllocateResponse). The caller owns the fds."""
        ticket = os.urandom(fdwire.TICKET_BYTES)
        self._send(fdwire.encode(fdwire.AllocateFrame(ticket, request)), [])
        try:
            with self._filing:
                self._read_until(lambda: ticket in self._replies, answer_pending=True)
                return self._replies.pop(ticket)
        except BaseException:
            self.discard(ticket)
            raise

    def _read_until(self, done: Callable[[], bool], *, answer_pending: bool) -> None:
        """Read and file frames until done() (caller holds _filing). While
        another thread reads, wait for it to file a frame instead."""
        while not done():
            if self._reading:
                self._filing.wait()
                continue
            self._reading = True
            self._filing.release()
            try:
                frame, fds = self._read_frame(answer_pending)
            finally:
                self._filing.acquire()
                self._reading = False
                self._filing.notify_all()
            self._file(frame, fds)

    def _file(self, frame: fdwire.Frame, fds: list[int]) -> None:
        """Keep a frame for the call it names (caller holds _filing)."""
        if isinstance(frame, fdwire.ErrorFrame):
            # The daemon rejected something this client sent earlier.
            _close_all(fds)
            raise from_status_value(frame.code, frame.message)
        if isinstance(frame, fdwire.Reply):
            if frame.ticket in self._abandoned:
                _close_all(fds)
            else:
                self._replies[frame.ticket] = (frame, fds)
            return
        if not isinstance(frame, fdwire.FdBatch) or len(fds) != len(frame.buffer_ids):
            _close_all(fds)
            raise ProtocolError("dmabufd sent a frame whose fds do not match its buffer ids")
        if frame.ticket in self._abandoned:
            _close_all(fds)
            return
        self._filed.setdefault(frame.ticket, []).extend(zip(frame.buffer_ids, fds, strict=True))

    def discard(self, ticket: bytes) -> None:
        """Close whatever fds arrived for a call that failed."""
        with self._filing:
            self._abandoned.add(ticket)
            _, fds = self._replies.pop(ticket, (None, []))
            _close_all(fds)
            _close_all(fd for _, fd in self._filed.pop(ticket, []))

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        with self._filing:
            for pairs in self._filed.values():
                _close_all(fd for _, fd in pairs)
            self._filed.clear()
            for _, fds in self._replies.values():
                _close_all(fds)
            self._replies.clear()
        with contextlib.suppress(OSError):  # wakes a thread waiting in poll() on it
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)
