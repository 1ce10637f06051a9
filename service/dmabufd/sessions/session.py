"""Sessions: one per client connection on the fd socket.

A session starts when a client connects to the fd socket. The daemon reads
the peer's credentials there (SO_PEERCRED: they cannot be forged), sends the
session's token in the HELLO frame, and ends the session when that socket
closes or the process exits (pidfd), whichever comes first.

Each gRPC call names its session twice: the token (metadata) says which
session; a ticket the client sent on the session's fd socket just before
the call proves the caller holds that socket. A leaked token is therefore
not enough to act as, or receive fds for, another client.

Locking: SessionTable._cond guards every table and each session's ticket
count and `closed` flag. Nothing slow runs under it.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dmabufd.errors import AccessDenied, SessionInvalid

log = logging.getLogger(__name__)

MAX_OUTSTANDING_TICKETS = 256
# Files sent for loads that have not been claimed yet, per session.
MAX_DEPOSITED_FILES = 16
TICKET_WAIT_S = 2.0


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


class FdSender(Protocol):
    """The session's fd socket, as the API layer sees it."""

    def send_fds(self, ticket: bytes, buffer_ids: list[int], fds: list[int]) -> None: ...


class Session:
    def __init__(self, session_id: int, peer: Peer, sender: FdSender) -> None:
        self.id = session_id
        self.peer = peer
        self.sender = sender
        self.token = secrets.token_bytes(32)
        self.connected_at = time.time()
        self.closed = False
        self.outstanding_tickets = 0
        # Ticket -> file fd sent with it (FILE frame), until a call claims it.
        self.deposits: dict[bytes, int] = {}

    def __repr__(self) -> str:
        return f"<Session {self.id} pid={self.peer.pid} uid={self.peer.uid}>"


class SessionTable:
    def __init__(self, on_close: Callable[[Session], None], ticket_wait_s: float = TICKET_WAIT_S) -> None:
        self._on_close = on_close
        self._ticket_wait_s = ticket_wait_s
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._by_token: dict[bytes, Session] = {}
        self._tickets: dict[bytes, Session] = {}
        self.opened = 0
        self.closed = 0

    def open(self, peer: Peer, sender: FdSender) -> Session:
        with self._cond:
            session = Session(next(self._ids), peer, sender)
            self._by_token[session.token] = session
            self.opened += 1
        log.info("session %d opened: pid %d uid %d (%s)", session.id, peer.pid, peer.uid, peer.command)
        return session

    def close(self, session: Session, reason: str) -> None:
        """End a session and release everything it holds. Idempotent."""
        with self._cond:
            if session.closed:
                return
            session.closed = True
            del self._by_token[session.token]
            for ticket in [t for t, owner in self._tickets.items() if owner is session]:
                del self._tickets[ticket]
            self.closed += 1
            deposits = list(session.deposits.values())
            session.deposits.clear()
            self._cond.notify_all()
        for fd in deposits:
            os.close(fd)
        self._on_close(session)
        log.info("session %d closed: %s", session.id, reason)

    def sessions(self) -> list[Session]:
        with self._cond:
            return list(self._by_token.values())

    def add_ticket(self, session: Session, ticket: bytes, file_fd: int | None = None) -> str | None:
        """Record a ticket that arrived on `session`'s fd socket, with the
        file fd its frame carried, if any. Returns a reason when it is
        refused; the caller then still owns file_fd."""
        with self._cond:
            if session.closed:
                return "session closed"
            if ticket in self._tickets:
                return "ticket already outstanding; send a fresh random ticket per call"
            if session.outstanding_tickets >= MAX_OUTSTANDING_TICKETS:
                return f"more than {MAX_OUTSTANDING_TICKETS} tickets outstanding; each call consumes one"
            if file_fd is not None:
                if len(session.deposits) >= MAX_DEPOSITED_FILES:
                    return f"more than {MAX_DEPOSITED_FILES} files sent and not yet loaded"
                session.deposits[ticket] = file_fd
            self._tickets[ticket] = session
            session.outstanding_tickets += 1
            self._cond.notify_all()
        return None

    def take_file(self, session: Session, ticket: bytes) -> int | None:
        """The file fd sent with `ticket`, now owned by the caller."""
        with self._cond:
            return session.deposits.pop(ticket, None)

    def claim(self, token_hex: str | None, ticket_hex: str | None) -> Session:
        """The session a call acts for. Consumes the call's ticket."""
        if not token_hex:
            raise SessionInvalid(
                "no session: connect to the fd socket first and pass its token in 'dmabufd-session' metadata"
            )
        if not ticket_hex:
            raise SessionInvalid("no ticket: send a TICKET frame on the fd socket and name it in 'dmabufd-ticket'")
        try:
            token, ticket = bytes.fromhex(token_hex), bytes.fromhex(ticket_hex)
        except ValueError:
            raise SessionInvalid("malformed session token or ticket (expected hex)") from None
        deadline = time.monotonic() + self._ticket_wait_s
        with self._cond:
            session = self._by_token.get(token)
            if session is None:
                raise SessionInvalid("unknown or closed session token; reconnect to the fd socket for a new session")
            while True:
                owner = self._tickets.get(ticket)
                if owner is session:
                    del self._tickets[ticket]
                    session.outstanding_tickets -= 1
                    return session
                if owner is not None:
                    raise AccessDenied(
                        "the session token does not belong to the fd socket the call's ticket was sent on"
                    )
                remaining = deadline - time.monotonic()
                if session.closed or remaining <= 0:
                    raise SessionInvalid(
                        "the call's ticket never arrived on this session's fd socket; "
                        "the token must be used by the process that holds the socket"
                    )
                self._cond.wait(remaining)
