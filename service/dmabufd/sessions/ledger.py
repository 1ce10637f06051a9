"""The ledger: every buffer the daemon handed out, and whose it is.

Allocations are charged to the client's uid (a daemon allocating on behalf
of others is otherwise charged for everything itself). A call first
reserves its bytes and buffer count against the uid's quota, allocates with
no lock held, then commits; a failed call cancels its reservation. So
concurrent calls can never together exceed a quota.

Lifetime: a record owns the daemon's Allocation (its fds). release() and
release_session() close those fds; the client's own fds stay valid, since
the kernel frees the memory only when the last fd and mapping are gone.

Locking: _lock guards every table and counter here; no syscall that can
block runs under it except close() of fds being released.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dmabufd.config import Config, Quota
from dmabufd.errors import BufferNotFound, QuotaExceeded, SessionInvalid
from dmabufd.heaps.backend import Allocation, BackendKind
from dmabufd.sessions.session import Session
from dmabufd_common.units import format_size


@dataclass
class BufferRecord:
    id: int
    session_id: int
    uid: int
    heap: str
    kind: BackendKind
    size: int
    kernel_name: str
    usage: str
    allocation: Allocation
    created_at: float = field(default_factory=time.time)


@dataclass
class Usage:
    """Bytes and buffers held (or reserved) by one uid."""

    bytes: int = 0
    buffers: int = 0


@dataclass(frozen=True)
class Totals:
    allocations: int
    releases: int
    denials: int


class Reservation:
    """Quota held for one call until it commits or is cancelled."""

    def __init__(self, session: Session, sizes: list[int]) -> None:
        self.session = session
        self.sizes = sizes
        self.records: list[BufferRecord] = []


class Ledger:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._next_id = 1
        self._buffers: dict[int, BufferRecord] = {}
        self._by_session: dict[int, dict[int, BufferRecord]] = {}
        self._usage: dict[int, Usage] = {}
        self._allocations = 0
        self._releases = 0
        self._denials = 0

    def new_ids(self, count: int) -> list[int]:
        """Buffer ids for buffers kept outside these books (resident models),
        from the same sequence so ids never collide."""
        with self._lock:
            first = self._next_id
            self._next_id += count
        return list(range(first, first + count))

    def quota(self, uid: int) -> Quota:
        return self._config.quota_for(uid)

    def count_denial(self) -> None:
        with self._lock:
            self._denials += 1

    @contextmanager
    def reserve(self, session: Session, sizes: list[int]) -> Iterator[Reservation]:
        """Hold quota for buffers of these sizes for the duration of the
        block; commit() inside it keeps them, anything else returns them."""
        uid = session.peer.uid
        quota = self.quota(uid)
        count, wanted = len(sizes), sum(sizes)
        with self._lock:
            usage = self._usage.setdefault(uid, Usage())
            if usage.buffers + count > quota.max_buffers:
                raise QuotaExceeded(
                    f"uid {uid} holds {usage.buffers} buffers; {count} more would pass its quota of "
                    f"{quota.max_buffers} buffers (release some first)"
                )
            if usage.bytes + wanted > quota.max_bytes:
                raise QuotaExceeded(
                    f"uid {uid} holds {format_size(usage.bytes)}; {format_size(wanted)} more would pass its "
                    f"quota of {format_size(quota.max_bytes)} (release some first)"
                )
            usage.bytes += wanted
            usage.buffers += count
        reservation = Reservation(session, sizes)
        try:
            yield reservation
        finally:
            with self._lock:
                usage.bytes -= wanted - sum(record.size for record in reservation.records)
                usage.buffers -= count - len(reservation.records)

    def commit(
        self, reservation: Reservation, heap: str, usage: str, allocations: list[tuple[Allocation, str]]
    ) -> list[BufferRecord]:
        """Enter allocated buffers into the books. If the session closed
        meanwhile, the buffers are closed and SessionInvalid raised."""
        session = reservation.session
        with self._lock:
            if session.closed:
                committed = False
            else:
                committed = True
                books = self._by_session.setdefault(session.id, {})
                for allocation, kernel_name in allocations:
                    record = BufferRecord(
                        id=self._next_id,
                        session_id=session.id,
                        uid=session.peer.uid,
                        heap=heap,
                        kind=allocation.kind,
                        size=allocation.size,
                        kernel_name=kernel_name,
                        usage=usage,
                        allocation=allocation,
                    )
                    self._next_id += 1
                    self._buffers[record.id] = record
                    books[record.id] = record
                    reservation.records.append(record)
                self._allocations += len(allocations)
        if not committed:
            for allocation, _ in allocations:
                allocation.close()
            raise SessionInvalid("the session closed during the call; its buffers were freed")
        return reservation.records

    def _forget(self, records: list[BufferRecord]) -> int:
        """Drop records from the books (caller holds _lock); returns bytes."""
        released = 0
        for record in records:
            del self._buffers[record.id]
            self._by_session.get(record.session_id, {}).pop(record.id, None)
            usage = self._usage[record.uid]
            usage.bytes -= record.size
            usage.buffers -= 1
            released += record.size
        self._releases += len(records)
        return released

    def release(self, session: Session, buffer_ids: list[int], close: bool = True) -> int:
        """Release the session's buffers; all or nothing. With close=False
        the caller takes over their allocations (a pool being recycled)."""
        with self._lock:
            books = self._by_session.get(session.id, {})
            missing = [buffer_id for buffer_id in buffer_ids if buffer_id not in books]
            if missing:
                raise BufferNotFound(f"this session holds no buffer with id(s) {', '.join(map(str, missing))}")
            records = [books[buffer_id] for buffer_id in dict.fromkeys(buffer_ids)]
            released = self._forget(records)
        if close:
            for record in records:
                record.allocation.close()
        return released

    def release_session(self, session: Session) -> int:
        with self._lock:
            records = list(self._by_session.pop(session.id, {}).values())
            released = self._forget(records)
        for record in records:
            record.allocation.close()
        return released

    def session_buffers(self, session_id: int) -> list[BufferRecord]:
        with self._lock:
            return sorted(self._by_session.get(session_id, {}).values(), key=lambda record: record.id)

    def find(self, session: Session, buffer_id: int) -> BufferRecord:
        with self._lock:
            record = self._by_session.get(session.id, {}).get(buffer_id)
        if record is None:
            raise BufferNotFound(f"this session holds no buffer with id {buffer_id}")
        return record

    def all_buffers(self) -> list[BufferRecord]:
        with self._lock:
            return sorted(self._buffers.values(), key=lambda record: record.id)

    def usage_of(self, uid: int) -> Usage:
        with self._lock:
            usage = self._usage.get(uid, Usage())
            return Usage(usage.bytes, usage.buffers)

    def totals(self) -> Totals:
        with self._lock:
            return Totals(self._allocations, self._releases, self._denials)
