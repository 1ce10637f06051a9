"""Sessions: one per client connection on the fd socket.

A session starts when a client connects to the fd socket. The daemon reads
the peer's credentials there (SO_PEERCRED: they cannot be forged), sends the
session's token in the HELLO frame, and ends the session when that socket
closes, the process exits (pidfd), or the client stops reading (outbox),
whichever comes first.

Each gRPC call names its session twice: the token (metadata) says which
session; a ticket the client sent on the session's fd socket proves the
caller holds that socket. A leaked token is therefore not enough to act as,
or receive fds for, another client. A ticket is consumed by the first call
on its session that names it, whatever that call's outcome; tickets no call
claims expire after TICKET_TTL_S. A call refused by a per-uid limit before
it waits for its ticket uses it up too, if it has arrived.

Lifetime: a session's deposits (file fds sent in FILE frames) belong to the
table until a call takes one with take_file(); close() closes the rest.

Threads: add_ticket(), take_ticket() and the ticket waiters run on the event
loop; take_file(), sessions() and the counters may be read from any thread.
_lock guards every table and each session's tickets, deposits and `closed`
flag; it is a leaf lock and nothing slow runs under it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dmabufd.errors import AccessDenied, SessionInvalid
from dmabufd.transport.closer import Closer
from dmabufd.transport.outbox import Outbox

log = logging.getLogger(__name__)

MAX_OUTSTANDING_TICKETS = 256
# Files sent for loads that have not been claimed yet, per session.
MAX_DEPOSITED_FILES = 16
TICKET_WAIT_S = 2.0
# A ticket no call claimed within this long is dropped (with its file).
TICKET_TTL_S = 60.0


@dataclass(frozen=True)
class Peer:
    """The client process, as the kernel reported it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    command: str

    @property
    def gids(self) -> frozenset[int]:
        return self.groups | {self.gid}


class Session:
    def __init__(self, session_id: int, peer: Peer, outbox: Outbox) -> None:
        self.id = session_id
        self.peer = peer
        self.outbox = outbox
        self.token = secrets.token_bytes(32)
        self.connected_at = time.time()
        self.closed = False
        # Ticket -> when it arrived; guarded by SessionTable._lock.
        self.tickets: dict[bytes, float] = {}
        # Ticket -> file fd sent with it (FILE frame), until a call claims it.
        self.deposits: dict[bytes, int] = {}
        # Loop only: calls waiting for a ticket that has not arrived yet.
        self.waiters: dict[bytes, asyncio.Future[None]] = {}

    def __repr__(self) -> str:
        return f"<Session {self.id} pid={self.peer.pid} uid={self.peer.uid}>"


class SessionTable:
    def __init__(
        self, on_close: Callable[[Session], None], closer: Closer, ticket_wait_s: float = TICKET_WAIT_S
    ) -> None:
        """Deposited files are let go through `closer`, never closed here:
        closing a client's file can block (transport/closer.py)."""
        self._on_close = on_close
        self._closer = closer
        self._ticket_wait_s = ticket_wait_s
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._by_token: dict[bytes, Session] = {}
        self._per_uid: dict[int, int] = {}
        self.opened = 0
        self.closed = 0

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def open(self, session: Session) -> None:
        with self._lock:
            self._by_token[session.token] = session
            self._per_uid[session.peer.uid] = self._per_uid.get(session.peer.uid, 0) + 1
            self.opened += 1
        peer = session.peer
        log.info(
            "session %d opened: pid %d uid %d (%s)",
            session.id,
            peer.pid,
            peer.uid,
            peer.command,
            extra={"session": session.id, "pid": peer.pid, "uid": peer.uid, "event": "session-opened"},
        )

    def count_for(self, uid: int) -> int:
        with self._lock:
            return self._per_uid.get(uid, 0)

    def close(self, session: Session, reason: str) -> None:
        """End a session and release everything it holds. Idempotent. Runs
        on the loop; on_close (the daemon's clean-up) must not block it."""
        with self._lock:
            if session.closed:
                return
            session.closed = True
            del self._by_token[session.token]
            left = self._per_uid[session.peer.uid] - 1
            if left:
                self._per_uid[session.peer.uid] = left
            else:
                del self._per_uid[session.peer.uid]
            self.closed += 1
            deposits = list(session.deposits.values())
            session.deposits.clear()
            session.tickets.clear()
        for waiter in session.waiters.values():
            if not waiter.done():
                waiter.set_exception(SessionInvalid(f"the session ended ({reason})"))
        session.waiters.clear()
        self._closer.close(session.peer.uid, deposits)
        self._on_close(session)
        log.info(
            "session %d closed: %s",
            session.id,
            reason,
            extra={
                "session": session.id,
                "pid": session.peer.pid,
                "uid": session.peer.uid,
                "event": "session-closed",
                "duration_s": round(time.time() - session.connected_at, 3),
            },
        )

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._by_token.values())

    def add_ticket(self, session: Session, ticket: bytes, file_fd: int | None = None) -> str | None:
        """Record a ticket that arrived on `session`'s fd socket, with the
        file fd its frame carried, if any. Returns a reason when it is
        refused; the caller then still owns file_fd. Loop only."""
        expired: list[int] = []
        with self._lock:
            if session.closed:
                return "session closed"
            if ticket in session.tickets:
                return "ticket already outstanding; send a fresh random ticket per call"
            if len(session.tickets) >= MAX_OUTSTANDING_TICKETS or (
                file_fd is not None and len(session.deposits) >= MAX_DEPOSITED_FILES
            ):
                expired = self._expire(session)
            if len(session.tickets) >= MAX_OUTSTANDING_TICKETS:
                problem = f"more than {MAX_OUTSTANDING_TICKETS} tickets outstanding; each call consumes one"
            elif file_fd is not None and len(session.deposits) >= MAX_DEPOSITED_FILES:
                problem = f"more than {MAX_DEPOSITED_FILES} files sent and not yet loaded"
            else:
                problem = None
                session.tickets[ticket] = time.monotonic()
                if file_fd is not None:
                    session.deposits[ticket] = file_fd
        self._closer.close(session.peer.uid, expired)
        if problem is None:
            waiter = session.waiters.pop(ticket, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return problem

    @staticmethod
    def _expire(session: Session) -> list[int]:
        """Drop tickets past their TTL (caller holds _lock); returns the
        deposited fds to close."""
        cutoff = time.monotonic() - TICKET_TTL_S
        fds: list[int] = []
        for ticket in [t for t, arrived in session.tickets.items() if arrived < cutoff]:
            del session.tickets[ticket]
            fd = session.deposits.pop(ticket, None)
            if fd is not None:
                fds.append(fd)
        return fds

    def take_file(self, session: Session, ticket: bytes) -> int | None:
        """The file fd sent with `ticket`, now owned by the caller."""
        with self._lock:
            return session.deposits.pop(ticket, None)

    def drop_file(self, session: Session, ticket: bytes) -> None:
        """A call that failed before its handler ran: close its file."""
        fd = self.take_file(session, ticket)
        if fd is not None:
            self._closer.close(session.peer.uid, [fd])

    def discard_ticket(self, session: Session, ticket_hex: str | None) -> None:
        """A call refused before it claimed its ticket (a per-uid limit)
        still uses it up: drop it (and its file) if it has arrived."""
        try:
            ticket = bytes.fromhex(ticket_hex or "")
        except ValueError:
            return
        with self._lock:
            arrived = session.tickets.pop(ticket, None)
            fd = session.deposits.pop(ticket, None) if arrived is not None else None
        if fd is not None:
            self._closer.close(session.peer.uid, [fd])

    def session_for(self, token_hex: str | None) -> Session:
        """The session a call names (no ticket checked yet)."""
        if not token_hex:
            raise SessionInvalid(
                "no session: connect to the fd socket first and pass its token in 'dmabufd-session' metadata"
            )
        try:
            token = bytes.fromhex(token_hex)
        except ValueError:
            raise SessionInvalid("malformed session token (expected hex)") from None
        with self._lock:
            session = self._by_token.get(token)
        if session is None:
            raise SessionInvalid("unknown or closed session token; reconnect to the fd socket for a new session")
        return session

    def _claim(self, session: Session, ticket: bytes) -> bool:
        expired: int | None = None
        with self._lock:
            if session.closed:
                raise SessionInvalid("the session ended")
            arrived = session.tickets.pop(ticket, None)
            if arrived is not None and arrived < time.monotonic() - TICKET_TTL_S:
                expired = session.deposits.pop(ticket, -1)
            elif arrived is not None:
                return True
            stolen = any(other.tickets.get(ticket) for other in self._by_token.values() if other is not session)
        if expired is not None:
            self._closer.close(session.peer.uid, [expired])
            raise SessionInvalid(f"the call's ticket expired ({TICKET_TTL_S:.0f} s after it arrived); send a fresh one")
        if stolen:
            raise AccessDenied("the session token does not belong to the fd socket the call's ticket was sent on")
        return False

    async def take_ticket(self, session: Session, ticket_hex: str | None) -> bytes:
        """Consume the call's ticket, waiting (on the loop, no thread held)
        up to ticket_wait_s for it to arrive on the session's fd socket."""
        if not ticket_hex:
            raise SessionInvalid("no ticket: send a TICKET frame on the fd socket and name it in 'dmabufd-ticket'")
        try:
            ticket = bytes.fromhex(ticket_hex)
        except ValueError:
            raise SessionInvalid("malformed ticket (expected hex)") from None
        if self._claim(session, ticket):
            return ticket
        if ticket in session.waiters:
            raise SessionInvalid("another call is already waiting for this ticket; use one ticket per call")
        waiter = asyncio.get_running_loop().create_future()
        session.waiters[ticket] = waiter
        try:
            await asyncio.wait_for(waiter, self._ticket_wait_s)
        except TimeoutError:
            raise SessionInvalid(
                "the call's ticket never arrived on this session's fd socket; "
                "the token must be used by the process that holds the socket"
            ) from None
        finally:
            if session.waiters.get(ticket) is waiter:
                del session.waiters[ticket]
        if not self._claim(session, ticket):
            raise SessionInvalid("the call's ticket was taken by another call")
        return ticket
