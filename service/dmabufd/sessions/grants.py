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
- A grant is a set of distinct buffers (at most limits.grant_buffers).
  Releasing any of them (or the pool) drops the grant: a redeemed grant
  never delivers a buffer that was released, nor one recycled into a new
  pool since, and the outbox checks each buffer's entitlement as it sends.
- Redeeming opens no fd: read-write grants send the buffer's own fd,
  read-only ones the O_RDONLY fd the buffer keeps once it is sealed.
- Redeemed buffers are not booked to the receiver (they are the owner's,
  and count against the owner's quota while the owner holds them, and
  after the owner released them while a receiver's process still does).
- read_only is offered only where the kernel enforces it: memfd buffers
  are sealed with F_SEAL_FUTURE_WRITE (from then on nobody, the owner
  included, can map them writable or write() them; mappings made before
  keep working) and the receiver gets O_RDONLY fds. A dma-buf cannot be
  made read-only for one holder, so read-only grants of heap or udmabuf
  buffers are refused (FAILED_PRECONDITION).

Lifetime: a grant owns one reference on each of its buffers from make()
until it is redeemed, revoked, dropped (a buffer released) or its owner's
session ends; take() hands those references to the caller.

Locking: _lock guards the table and its token index. Inside it, take()
takes each buffer's lock to record the receiver (GrantTable -> Buffer);
nothing else is locked under it (buffers are put and fds sent with it
dropped).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from dmabufd.errors import BufferNotFound, DmabufdError, InvalidRequest
from dmabufd.heaps.backend import BackendKind
from dmabufd.heaps.buffer import BufferReleased
from dmabufd.sessions.ledger import BufferRecord
from dmabufd.sessions.session import Session
from dmabufd_common import uapi
from dmabufd_common.reasons import Reason

MAX_GRANTS_PER_SESSION = 256


class NotEnforceable(DmabufdError):
    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.NOT_ENFORCEABLE


@dataclass
class GrantEntry:
    id: int
    owner: Session
    records: list[BufferRecord]
    pool_id: int
    to_uid: int | None
    token: bytes | None
    read_only: bool

    @property
    def bytes(self) -> int:
        return sum(record.size for record in self.records)

    def put(self) -> None:
        for record in self.records:
            record.buffer.put()


def seal_read_only(records: list[BufferRecord]) -> None:
    for record in records:
        if record.kind is not BackendKind.MEMFD:
            raise NotEnforceable(
                f"buffer {record.id} is a {record.kind.name.lower().replace('_', ' ')} dma-buf: the kernel cannot "
                "make it read-only for one holder; grant it read-write, or use memfd buffers"
            )
    # Seals cannot be taken back: check every buffer before sealing any.
    for record in records:
        if not record.buffer.can_seal():
            raise NotEnforceable(
                f"buffer {record.id} can take no more seals: a holder of a read-write fd sealed them "
                "(F_SEAL_SEAL); grant it read-write"
            )
    for record in records:
        try:
            record.buffer.seal_read_only(uapi.F_SEAL_FUTURE_WRITE)
        except OSError as error:  # sealed meanwhile by a holder
            raise NotEnforceable(f"buffer {record.id} cannot be sealed read-only: {error.strerror}") from None


class GrantTable:
    def __init__(self, max_buffers: int = 256) -> None:
        self._max_buffers = max_buffers
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._grants: dict[int, GrantEntry] = {}
        # SHA-256 of each open token grant's token -> the grant: a redeem
        # looks one up instead of comparing against every open grant.
        self._by_token: dict[bytes, GrantEntry] = {}
        # Buffer id -> the open grants that name it: a Release (on the event
        # loop) drops the grants of its buffers without a look at the others.
        self._by_buffer: dict[int, set[int]] = {}

    def check_ids(self, buffer_ids: list[int]) -> None:
        """A grant names distinct buffers, and not too many: refuse before
        looking any of them up."""
        if len(buffer_ids) > self._max_buffers:
            raise InvalidRequest(
                f"a grant names at most {self._max_buffers} buffers (limits.grant_buffers), not {len(buffer_ids)}"
            )
        if len(set(buffer_ids)) != len(buffer_ids):
            repeated = next(i for i in buffer_ids if buffer_ids.count(i) > 1)
            raise InvalidRequest(f"buffer {repeated} is named more than once; a grant is a set of buffers")

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
        self.check_ids([record.id for record in records])
        # References first: a buffer the owner releases meanwhile fails here
        # (NOT_FOUND), never under the seal below.
        taken: list[BufferRecord] = []
        try:
            for record in records:
                record.buffer.get()
                taken.append(record)
        except BufferReleased:
            for record in taken:
                record.buffer.put()
            raise BufferNotFound("a buffer of the grant was released meanwhile") from None
        try:
            if read_only:
                seal_read_only(records)
        except BaseException:
            for record in taken:
                record.buffer.put()
            raise
        token = None if to_uid is not None else secrets.token_bytes(32)
        with self._lock:
            full = sum(1 for g in self._grants.values() if g.owner is owner) >= MAX_GRANTS_PER_SESSION
            released = owner.closed or any(record.released for record in records)
            entry = GrantEntry(next(self._ids), owner, records, pool_id, to_uid, token, read_only)
            if not (full or released):
                self._grants[entry.id] = entry
                for record in records:
                    self._by_buffer.setdefault(record.id, set()).add(entry.id)
                if token is not None:
                    self._by_token[hashlib.sha256(token).digest()] = entry
        if full or released:
            entry.put()
            if full:
                raise InvalidRequest(f"more than {MAX_GRANTS_PER_SESSION} open grants; revoke some")
            raise BufferNotFound("a buffer of the grant was released meanwhile")
        return entry

    def take(self, receiver: Session, *, token_hex: str = "", grant_id: int = 0) -> GrantEntry:
        """Claim a grant for `receiver` (once); the caller then owns its
        references (GrantEntry.put). NOT_FOUND for anything that is not an
        open grant the receiver may redeem: no oracle for tokens."""
        unknown = BufferNotFound(
            "no such grant for this uid (never made, already redeemed, revoked, its owner is gone, "
            "or it is one redeemed with its token)"
        )
        token = b""
        if token_hex:
            try:
                token = bytes.fromhex(token_hex)
            except ValueError:
                raise InvalidRequest("a grant token is 64 hex digits") from None
            if len(token) != 32:
                raise unknown
        with self._lock:
            if token:
                entry = self._by_token.get(hashlib.sha256(token).digest())
                if entry is not None and (entry.token is None or not hmac.compare_digest(entry.token, token)):
                    entry = None
            else:
                # Another uid's grant, or a token grant, looks like none at
                # all: ids are counted, and would tell who grants what.
                entry = self._grants.get(grant_id)
                if entry is not None and entry.to_uid != receiver.peer.uid:
                    entry = None
            if entry is None or entry.owner.closed or any(record.released for record in entry.records):
                raise unknown
            self._remove(entry)
            # Before the lock is dropped: from here on a release of these
            # buffers looks in the receiver's processes too, and never
            # recycles them (heaps/buffer.py, recipients).
            for record in entry.records:
                record.buffer.add_recipient(receiver.peer.uid, receiver.peer.pid)
            return entry

    def _remove(self, entry: GrantEntry) -> None:
        """Take an open grant out of the table (caller holds _lock)."""
        del self._grants[entry.id]
        for record in entry.records:
            naming = self._by_buffer[record.id]
            naming.discard(entry.id)
            if not naming:
                del self._by_buffer[record.id]
        if entry.token is not None:
            del self._by_token[hashlib.sha256(entry.token).digest()]

    def _drop(self, predicate: Callable[[GrantEntry], bool]) -> None:
        with self._lock:
            dropped = [g for g in self._grants.values() if predicate(g)]
            for entry in dropped:
                self._remove(entry)
        for entry in dropped:
            entry.put()

    def revoke(self, owner: Session, grant_id: int) -> None:
        with self._lock:
            entry = self._grants.get(grant_id)
            if entry is None or entry.owner is not owner:
                raise BufferNotFound(f"this session has no open grant {grant_id}")
            self._remove(entry)
        entry.put()

    def owner_closed(self, owner: Session) -> None:
        self._drop(lambda grant: grant.owner is owner)

    def buffers_released(self, buffer_ids: list[int]) -> None:
        """Released buffers take every grant that names them with them."""
        with self._lock:
            naming = {grant_id for buffer_id in buffer_ids for grant_id in self._by_buffer.get(buffer_id, ())}
            dropped = [self._grants[grant_id] for grant_id in naming]
            for entry in dropped:
                self._remove(entry)
        for entry in dropped:
            entry.put()

    def offered_to(self, uid: int) -> list[GrantEntry]:
        with self._lock:
            return [g for g in self._grants.values() if g.to_uid == uid and not g.owner.closed]

    def made_by(self, owner: Session) -> list[GrantEntry]:
        with self._lock:
            return [g for g in self._grants.values() if g.owner is owner]

    def close(self) -> None:
        self._drop(lambda grant: True)
