"""Grants: one client shares buffers with another.

The owner grants buffers (or a whole pool) to a uid, or makes a one-time
token it passes to the receiver by any means. The receiver redeems the
grant and gets its own fds on its own fd socket; the daemon never sends an
fd to anyone but the session that asked for it.

What each party can rely on (docs/camera.md has the full table):
- A grant is redeemed once. A redeemed token, a revoked grant, or a grant
  whose owner's session ended can no longer be redeemed (NOT_FOUND).
- fds already delivered stay valid after revocation or the owner's death:
  the kernel keeps the memory while any fd or mapping exists, and the
  daemon cannot take an fd back.
- Redeemed buffers are not booked to the receiver (they are the owner's,
  and count against the owner's quota while the owner holds them).
- read_only is offered only where the kernel enforces it: memfd buffers
  are sealed with F_SEAL_FUTURE_WRITE (from then on nobody, the owner
  included, can map them writable or write() them; mappings made before
  keep working) and the receiver gets O_RDONLY fds. A dma-buf cannot be
  made read-only for one holder, so read-only grants of heap or udmabuf
  buffers are refused (FAILED_PRECONDITION).

Locking: _lock guards the table; sending fds happens outside it.
"""

from __future__ import annotations

import fcntl
import hmac
import itertools
import os
import secrets
import threading
from dataclasses import dataclass, field

import grpc

from dmabufd.errors import AccessDenied, BufferNotFound, DmabufdError, InvalidRequest
from dmabufd.heaps.backend import BackendKind
from dmabufd.sessions.ledger import BufferRecord
from dmabufd.sessions.session import Session
from dmabufd_common import uapi

MAX_GRANTS_PER_SESSION = 256


class NotEnforceable(DmabufdError):
    status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class GrantEntry:
    id: int
    owner: Session
    records: list[BufferRecord]
    pool_id: int
    to_uid: int | None
    token: bytes | None
    read_only: bool
    redeemed_by: set[int] = field(default_factory=set)  # pids

    @property
    def bytes(self) -> int:
        return sum(record.size for record in self.records)


def seal_read_only(records: list[BufferRecord]) -> None:
    for record in records:
        if record.kind is not BackendKind.MEMFD:
            raise NotEnforceable(
                f"buffer {record.id} is a {record.kind.name.lower().replace('_', ' ')} dma-buf: the kernel cannot "
                "make it read-only for one holder; grant it read-write, or use memfd buffers"
            )
    for record in records:
        fcntl.fcntl(record.allocation.fd, fcntl.F_ADD_SEALS, uapi.F_SEAL_FUTURE_WRITE)


def read_only_fds(records: list[BufferRecord]) -> list[int]:
    """New O_RDONLY descriptors of sealed memfds (the caller closes them)."""
    return [os.open(f"/proc/self/fd/{r.allocation.fd}", os.O_RDONLY | os.O_CLOEXEC) for r in records]


class GrantTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._grants: dict[int, GrantEntry] = {}

    def make(
        self,
        owner: Session,
        records: list[BufferRecord],
        *,
        pool_id: int,
        to_uid: int | None,
        read_only: bool,
    ) -> GrantEntry:
        if not records:
            raise InvalidRequest("nothing to grant: name buffers or a pool")
        if read_only:
            seal_read_only(records)
        token = None if to_uid is not None else secrets.token_bytes(32)
        with self._lock:
            if sum(1 for g in self._grants.values() if g.owner is owner) >= MAX_GRANTS_PER_SESSION:
                raise InvalidRequest(f"more than {MAX_GRANTS_PER_SESSION} open grants; revoke some")
            entry = GrantEntry(next(self._ids), owner, records, pool_id, to_uid, token, read_only)
            self._grants[entry.id] = entry
        return entry

    def take(self, receiver: Session, *, token_hex: str = "", grant_id: int = 0) -> GrantEntry:
        """Claim a grant for `receiver` (once). NOT_FOUND for anything that
        is not an open grant the receiver may redeem: no oracle for tokens."""
        unknown = BufferNotFound("no such grant (never made, already redeemed, revoked, or its owner is gone)")
        with self._lock:
            if token_hex:
                try:
                    token = bytes.fromhex(token_hex)
                except ValueError:
                    raise InvalidRequest("a grant token is hex") from None
                entry = next(
                    (g for g in self._grants.values() if g.token is not None and hmac.compare_digest(g.token, token)),
                    None,
                )
            else:
                entry = self._grants.get(grant_id)
                if entry is not None and entry.to_uid != receiver.peer.uid:
                    if entry.to_uid is None:
                        raise AccessDenied("this grant is redeemed with its token, not its id")
                    entry = None
            if entry is None or entry.owner.closed:
                raise unknown
            del self._grants[entry.id]
            entry.redeemed_by.add(receiver.peer.pid)
            return entry

    def revoke(self, owner: Session, grant_id: int) -> None:
        with self._lock:
            entry = self._grants.get(grant_id)
            if entry is None or entry.owner is not owner:
                raise BufferNotFound(f"this session has no open grant {grant_id}")
            del self._grants[grant_id]

    def owner_closed(self, owner: Session) -> None:
        with self._lock:
            for grant_id in [g.id for g in self._grants.values() if g.owner is owner]:
                del self._grants[grant_id]

    def offered_to(self, uid: int) -> list[GrantEntry]:
        with self._lock:
            return [g for g in self._grants.values() if g.to_uid == uid and not g.owner.closed]

    def made_by(self, owner: Session) -> list[GrantEntry]:
        with self._lock:
            return [g for g in self._grants.values() if g.owner is owner]
