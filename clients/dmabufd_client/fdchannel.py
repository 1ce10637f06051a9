"""The client's end of the fd socket.

The daemon sends a HELLO frame on connect (the session token), then, for
every call that creates buffers, FDS frames tagged with that call's ticket
before the call returns. Several threads may make calls at once: whoever
reads a frame for another call's ticket files it under that ticket, so
every caller ends up with exactly its own fds.

Ownership: fds received here belong to the caller of take() from the
moment take() returns them; frames nobody claims (a failed call's) are
closed by discard().
"""

from __future__ import annotations

import collections
import os
import secrets
import socket
import threading
from pathlib import Path

from dmabufd_client.errors import ProtocolError, Unavailable, from_status_value
from dmabufd_common import fdwire

# Tickets sent ahead of need (the daemon allows 256 outstanding per session).
SPARE_TICKETS = 4


class FdChannel:
    def __init__(self, path: Path, timeout_s: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(path))
        except OSError as error:
            self._sock.close()
            raise Unavailable(f"cannot reach dmabufd's fd socket {path}: {error.strerror or error}") from None
        self._read_lock = threading.Lock()  # one reader at a time
        # Guarded by _read_lock: fds read for calls that have not taken them
        # yet, and tickets of failed calls whose late fds are closed on sight.
        self._filed: dict[bytes, list[tuple[int, int]]] = {}
        self._abandoned: set[bytes] = set()
        frame, _ = self._read_frame()  # HELLO and ERROR carry no fds
        if isinstance(frame, fdwire.ErrorFrame):
            self.close()
            raise from_status_value(frame.code, frame.message)
        if not isinstance(frame, fdwire.Hello):
            self.close()
            raise ProtocolError(f"expected HELLO from dmabufd, got {type(frame).__name__}")
        self.hello = frame
        self._spares_lock = threading.Lock()  # guards _spares
        self._spares: collections.deque[bytes] = collections.deque()
        self.replenish()

    @property
    def token_hex(self) -> str:
        return self.hello.token.hex()

    def new_ticket(self, file_fd: int | None = None) -> bytes:
        """A ticket for the next call to name in its metadata: one sent
        ahead by replenish() if there is one (the daemon has most likely
        read it already, so the call never waits for it), else a fresh one
        sent now (always fresh when it carries a file)."""
        if file_fd is None:
            with self._spares_lock:
                if self._spares:
                    return self._spares.popleft()
        ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
        try:
            if file_fd is None:
                self._sock.send(fdwire.encode(fdwire.Ticket(ticket)))
            else:
                socket.send_fds(self._sock, [fdwire.encode(fdwire.FileTicket(ticket))], [file_fd])
        except OSError as error:
            raise Unavailable(f"dmabufd's fd socket is gone: {error.strerror or error}") from None
        return ticket

    def replenish(self) -> None:
        """Send tickets ahead of the calls that will use them, off the
        calls' critical path."""
        with self._spares_lock:
            missing = SPARE_TICKETS - len(self._spares)
            for _ in range(missing):
                ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
                try:
                    self._sock.send(fdwire.encode(fdwire.Ticket(ticket)))
                except OSError:
                    return  # the next call reports the dead socket
                self._spares.append(ticket)

    def _read_frame(self) -> tuple[fdwire.Frame, list[int]]:
        try:
            data, fds, flags = fdwire.receive(self._sock)
        except TimeoutError:
            raise Unavailable("timed out waiting for fds from dmabufd") from None
        except OSError as error:
            raise Unavailable(f"dmabufd's fd socket failed: {error.strerror or error}") from None
        if not data and not fds:
            raise Unavailable("dmabufd closed the fd socket (daemon stopped, or this session was ended)")
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
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
        with self._read_lock:
            while len(self._filed.get(ticket, [])) < count:
                frame, fds = self._read_frame()
                if isinstance(frame, fdwire.ErrorFrame):
                    # The daemon rejected something this client sent earlier.
                    for fd in fds:
                        os.close(fd)
                    raise from_status_value(frame.code, frame.message)
                if not isinstance(frame, fdwire.FdBatch) or len(fds) != len(frame.buffer_ids):
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError("dmabufd sent a frame whose fds do not match its buffer ids")
                if frame.ticket in self._abandoned:
                    for fd in fds:
                        os.close(fd)
                    continue
                self._filed.setdefault(frame.ticket, []).extend(zip(frame.buffer_ids, fds, strict=True))
            return self._filed.pop(ticket, [])

    def discard(self, ticket: bytes) -> None:
        """Close whatever fds arrived for a call that failed."""
        with self._read_lock:
            self._abandoned.add(ticket)
            for _, fd in self._filed.pop(ticket, []):
                os.close(fd)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        with self._read_lock:
            for pairs in self._filed.values():
                for _, fd in pairs:
                    os.close(fd)
            self._filed.clear()
        self._sock.close()
