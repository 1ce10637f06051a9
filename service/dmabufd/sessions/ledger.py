"""The ledger: every buffer the daemon handed out, and whose it is.

Allocations are charged to the client's uid (a daemon allocating on behalf
of others is otherwise charged for everything itself). A call first
reserves its bytes and buffer count against the uid's quota, allocates with
no lock held, then commits; a failed call cancels its reservation. So
concurrent calls can never together exceed a quota.

A quota charges what the client can still reach. Releasing a buffer takes
it out of the session's books (it can no longer be granted, listed or
sent), but while a process of the client's uid, or of a uid a grant gave
it to, still holds it (an fd or a mapping, as /proc shows) it stays
charged to the owner, "lingering"; reap() frees the charge once it is
really gone. Root is checked in the session's own
process only (scanning every root process on each release would cost more
than root's quota protects).

Lifetime: a record owns one reference on its Buffer (see heaps/buffer.py),
taken over from the caller of commit(). Release revokes the buffer (nobody
may receive it any more) and gives the reference back, or hands it to the
caller (keep=True: a pool being recycled); a lingering buffer's reference is
kept until reap() finds it gone, so its identity cannot be reused meanwhile.

Releasing is two steps, so the event loop can serve a Release without
asking /proc itself: release_begin() changes the books and returns the
question (a procfs.HolderQuery), release_end() settles the charges with
its answer (sessions/holders.py asks it of a helper process). release()
does both on the calling thread.

Locking: _lock guards every table and counter here. It is a leaf lock: no
syscall and no call into another component runs under it (the /proc checks
and the buffers' put() run after it is dropped).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from dmabufd.config import Config, Quota
from dmabufd.errors import BufferBusy, BufferNotFound, QuotaExceeded, SessionInvalid
from dmabufd.heaps.backend import BackendKind
from dmabufd.heaps.buffer import Buffer, put_all
from dmabufd.sessions import procfs
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
    buffer: Buffer
    created_at: float = field(default_factory=time.time)
    # The pool this buffer belongs to (0: none); it is released with its pool.
    pool_id: int = 0
    released: bool = False

    @property
    def identity(self) -> tuple[int, int]:
        return self.buffer.identity


@dataclass
class Usage:
    """Bytes and buffers held (or reserved, or lingering) by one uid."""

    bytes: int = 0
    buffers: int = 0


@dataclass(frozen=True)
class Totals:
    allocations: int
    releases: int
    denials: int
    lingering: int


@dataclass(frozen=True)
class Released:
    """Records a release took out of the books, still charged to `uid`
    until release_end() settles them with the answer to `query`."""

    uid: int
    pid: int
    records: list[BufferRecord]
    query: procfs.HolderQuery


@dataclass
class _Lingering:
    """A released buffer that a process of its uid still holds."""

    uid: int
    pid: int
    size: int
    buffer: Buffer


class Reservation:
    """Quota held for one call until its block ends: what commit() booked
    into `records` stays charged, the rest is given back. Made by
    Ledger.reserve(), which has already charged it; a class, not a
    generator, because every allocation takes one."""

    __slots__ = ("_ledger", "records", "session", "sizes")

    def __init__(self, ledger: Ledger, session: Session, sizes: list[int]) -> None:
        self._ledger = ledger
        self.session = session
        self.sizes = sizes
        self.records: list[BufferRecord] = []

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._ledger._settle_reservation(self)


class Ledger:
    def __init__(self, config: Config, on_release: Callable[[list[int]], None] | None = None) -> None:
        """`on_release(buffer_ids)` is told of every released buffer (grants
        naming them are dropped); it runs with no lock of ours held."""
        self._config = config
        self._on_release = on_release
        self._lock = threading.Lock()
        self._next_id = 1
        self._buffers: dict[int, BufferRecord] = {}
        self._by_session: dict[int, dict[int, BufferRecord]] = {}
        self._usage: dict[int, Usage] = {}
        self._lingering: list[_Lingering] = []
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

    def _charge(self, uid: int, count: int, wanted: int) -> Usage:
        """Take `wanted` bytes and `count` buffers of uid's quota (caller holds _lock)."""
        quota = self.quota(uid)
        usage = self._usage.setdefault(uid, Usage())
        if usage.buffers + count > quota.max_buffers:
            raise QuotaExceeded(
                f"uid {uid} holds {usage.buffers} buffers; {count} more would pass its quota of "
                f"{quota.max_buffers} buffers (release some first, and close their fds)"
            )
        if usage.bytes + wanted > quota.max_bytes:
            raise QuotaExceeded(
                f"uid {uid} holds {format_size(usage.bytes)}; {format_size(wanted)} more would pass its "
                f"quota of {format_size(quota.max_bytes)} (release some first, and close their fds and mappings)"
            )
        usage.bytes += wanted
        usage.buffers += count
        return usage

    def _uncharge(self, uid: int, count: int, nbytes: int) -> None:
        usage = self._usage[uid]
        usage.bytes -= nbytes
        usage.buffers -= count
        if not usage.bytes and not usage.buffers:
            del self._usage[uid]

    def reserve(self, session: Session, sizes: list[int]) -> Reservation:
        """Charge the uid for buffers of these sizes, for use as `with
        ledger.reserve(...) as reservation:`; commit() inside the block
        keeps them, the end of the block returns the rest."""
        with self._lock:
            self._charge(session.peer.uid, len(sizes), sum(sizes))
        return Reservation(self, session, sizes)

    def _settle_reservation(self, reservation: Reservation) -> None:
        kept = reservation.records
        with self._lock:
            self._uncharge(
                reservation.session.peer.uid,
                len(reservation.sizes) - len(kept),
                sum(reservation.sizes) - sum(record.size for record in kept),
            )

    @contextmanager
    def charge(self, uid: int, nbytes: int, count: int) -> Iterator[None]:
        """Charge memory the uid can reach outside these books (a resident
        model it holds) for as long as the block runs; see hold()."""
        with self._lock:
            self._charge(uid, count, nbytes)
        try:
            yield
        finally:
            with self._lock:
                self._uncharge(uid, count, nbytes)

    def hold(self, uid: int, nbytes: int, count: int) -> None:
        """Charge memory the uid can reach outside these books until unhold()."""
        with self._lock:
            self._charge(uid, count, nbytes)

    def unhold(self, uid: int, nbytes: int, count: int) -> None:
        with self._lock:
            self._uncharge(uid, count, nbytes)

    def unhold_held(self, uid: int, pid: int, buffers: list[Buffer]) -> None:
        """End a hold() of `buffers` (a resident model `uid` let go of; the
        model lives on for others): those a process of the uid still holds
        stay charged, lingering, until reap() finds them gone; the rest
        are uncharged now. Takes over one reference of the caller's on
        each (the lingering entry's)."""
        held = procfs.held(self._query(uid, pid, buffers))
        gone = [buffer for buffer in buffers if buffer.identity not in held]
        with self._lock:
            for buffer in buffers:
                if buffer.identity in held:
                    self._lingering.append(_Lingering(uid, pid, buffer.size, buffer))
            self._uncharge(uid, len(gone), sum(buffer.size for buffer in gone))
        for buffer in gone:
            buffer.put()

    def hold_adopting(self, uid: int, pid: int, buffers: list[Buffer]) -> None:
        """hold() of `buffers` (a resident model `uid` takes), for which the
        uid may still be charged as lingering (it let go of the model while
        one of its processes kept a mapping or an fd): those charges become
        part of the hold, so the buffers are charged once. All or nothing:
        if the hold does not fit the quota, the lingering charges stay.
        Root and the daemon's own uid adopt only what `pid` left: their
        holders are checked one process at a time."""
        wanted = {id(buffer) for buffer in buffers}
        one_process = uid in (0, os.geteuid())
        with self._lock:
            adopted = [
                entry
                for entry in self._lingering
                if entry.uid == uid and id(entry.buffer) in wanted and (entry.pid == pid or not one_process)
            ]
            self._charge(
                uid,
                len(buffers) - len(adopted),
                sum(buffer.size for buffer in buffers) - sum(entry.size for entry in adopted),
            )
            for entry in adopted:
                self._lingering.remove(entry)
        for entry in adopted:
            entry.buffer.put()

    def linger(self, uid: int, pid: int, buffers: list[Buffer]) -> None:
        """Buffers charged with hold() whose fds may have gone out without
        ever being booked (a streamed model whose load failed) end as
        released ones do: nobody may receive them any more, those a process
        of `uid` still holds stay charged (lingering) until reap() finds
        them gone, and the rest are uncharged and freed. Takes over the
        caller's reference on each."""
        if not buffers:
            return
        for buffer in buffers:
            buffer.revoke()
        self.unhold_held(uid, pid, buffers)

    def commit(
        self,
        reservation: Reservation,
        heap: str,
        usage: str,
        buffers: list[tuple[Buffer, str]],
        pool_id: int = 0,
    ) -> list[BufferRecord]:
        """Enter allocated buffers into the books; their references move
        into the records. If the session closed meanwhile, SessionInvalid is
        raised and the references stay the caller's."""
        session = reservation.session
        with self._lock:
            committed = not session.closed
            if committed:
                books = self._by_session.setdefault(session.id, {})
                for buffer, kernel_name in buffers:
                    record = BufferRecord(
                        id=self._next_id,
                        session_id=session.id,
                        uid=session.peer.uid,
                        heap=heap,
                        kind=buffer.kind,
                        size=buffer.size,
                        kernel_name=kernel_name,
                        usage=usage,
                        buffer=buffer,
                        pool_id=pool_id,
                    )
                    self._next_id += 1
                    self._buffers[record.id] = record
                    books[record.id] = record
                    reservation.records.append(record)
                self._allocations += len(buffers)
        if not committed:
            # The references stay the caller's (the provision frees them).
            raise SessionInvalid("the session closed during the call; its buffers were freed")
        for buffer, _ in buffers:
            buffer.entitle(session.id)
        return reservation.records

    def _forget(self, records: list[BufferRecord]) -> None:
        """Drop records from the books, not from the uid's usage (caller holds _lock)."""
        for record in records:
            del self._buffers[record.id]
            self._by_session.get(record.session_id, {}).pop(record.id, None)
            record.released = True
        self._releases += len(records)

    def release(
        self, session: Session, buffer_ids: list[int], *, pool_id: int = 0, keep: bool = False
    ) -> tuple[int, list[BufferRecord]]:
        """Release the session's buffers; all or nothing. Buffers of a pool
        are released only with it (pool_id). Returns (bytes released, the
        records whose reference the caller now owns: with keep=True, every
        record no process still holds). Asks /proc on this thread: it may
        block (release_begin() and release_end() split it for the loop)."""
        released = self.release_begin(session, buffer_ids, pool_id=pool_id)
        return self.release_end(released, procfs.held(released.query), keep=keep)

    def release_begin(self, session: Session, buffer_ids: list[int], *, pool_id: int = 0) -> Released:
        """The bookkeeping half of release(), which never blocks: the
        buffers leave the session's books and are revoked; their charge
        stays until release_end() is given the answer to the returned
        query."""
        with self._lock:
            books = self._by_session.get(session.id, {})
            missing = [buffer_id for buffer_id in buffer_ids if buffer_id not in books]
            if missing:
                shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
                raise BufferNotFound(f"this session holds no buffer with id(s) {shown}")
            records = [books[buffer_id] for buffer_id in dict.fromkeys(buffer_ids)]
            pooled = next((r for r in records if r.pool_id != pool_id), None)
            if pooled is not None:
                raise BufferBusy(
                    f"buffer {pooled.id} belongs to pool {pooled.pool_id}: release the whole pool (ReleasePool)"
                )
            self._forget(records)
        return self._revoke(session.peer.pid, records)

    def release_session(self, session: Session) -> int:
        with self._lock:
            records = list(self._by_session.pop(session.id, {}).values())
            self._forget(records)
        released = self._revoke(session.peer.pid, records)
        nbytes, _ = self.release_end(released, procfs.held(released.query))
        return nbytes

    def _revoke(self, pid: int, records: list[BufferRecord]) -> Released:
        """Records that just left the books: nobody may receive them any more."""
        for record in records:
            record.buffer.revoke()
        uid = records[0].uid if records else 0
        return Released(uid, pid, records, self._query(uid, pid, [record.buffer for record in records]))

    def release_end(
        self, released: Released, held: frozenset[procfs.FileIdentity], *, keep: bool = False
    ) -> tuple[int, list[BufferRecord]]:
        """Settle a release_begin() with the answer to its query: the
        buffers a process still holds stay charged (lingering), the rest
        are uncharged and freed, or with keep=True handed to the caller
        (returned with their references). Returns (bytes released, those)."""
        records, uid = released.records, released.uid
        if not records:
            return 0, []
        gone = [r for r in records if r.identity not in held]
        with self._lock:
            for record in records:
                if record.identity in held:
                    self._lingering.append(_Lingering(uid, released.pid, record.size, record.buffer))
            self._uncharge(uid, len(gone), sum(r.size for r in gone))
        if self._on_release is not None:
            self._on_release([record.id for record in records])
        if not keep:
            put_all([record.buffer for record in gone])
            return sum(r.size for r in records), []
        return sum(r.size for r in records), gone

    @staticmethod
    def _query(uid: int, pid: int, buffers: list[Buffer]) -> procfs.HolderQuery:
        """Who may still hold `buffers` of `uid`'s (the session's process
        `pid`): every process of the uid, and of every uid a grant gave
        them to; root and the daemon's own uid by the one process only."""
        pids: set[int] = set()
        uids: set[int] = set()
        for holder_uid, holder_pid in {(uid, pid)}.union(*(buffer.recipients() for buffer in buffers)):
            if holder_uid == 0 or holder_uid == os.geteuid():
                pids.add(holder_pid)
            else:
                uids.add(holder_uid)
        pids.discard(os.getpid())
        return procfs.HolderQuery(tuple(sorted(pids)), tuple(sorted(uids)), tuple(b.identity for b in buffers))

    def reap(self) -> int:
        """Free the charge of lingering buffers no process holds any more;
        returns how many were freed. Called periodically, off the loop."""
        with self._lock:
            lingering = list(self._lingering)
        if not lingering:
            return 0
        # Entries that may be held by the same processes are checked together.
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[_Lingering]] = {}
        for entry in lingering:
            query = self._query(entry.uid, entry.pid, [entry.buffer])
            groups.setdefault((query.pids, query.uids), []).append(entry)
        gone: list[_Lingering] = []
        for (pids, uids), entries in groups.items():
            wanted = tuple(entry.buffer.identity for entry in entries)
            held = procfs.held(procfs.HolderQuery(pids, uids, wanted))
            gone += [entry for entry in entries if entry.buffer.identity not in held]
        with self._lock:
            for entry in gone:
                self._lingering.remove(entry)
                self._uncharge(entry.uid, 1, entry.size)
        for entry in gone:
            entry.buffer.put()
        return len(gone)

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
            return Totals(self._allocations, self._releases, self._denials, len(self._lingering))

    def close(self) -> None:
        """Daemon stop: give back the lingering references."""
        with self._lock:
            lingering, self._lingering = self._lingering, []
        for entry in lingering:
            entry.buffer.put()
