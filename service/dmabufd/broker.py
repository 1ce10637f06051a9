"""Allocation end to end: pick a heap, check sizes, reserve quota,
allocate, book, deliver the fds. The one place those steps live; the gRPC
layer and the file loader only call them.

Failure at any step undoes the steps before it: buffers allocated but not
booked are put back (freed), booked but not queued are released, and the
quota reservation returns what was not kept. fds leave only through the
session's outbox (transport/outbox.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from dmabufd.api.naming import kernel_name
from dmabufd.config import Config, physical_memory
from dmabufd.errors import BufferNotFound, DmabufdError, HeapUnavailable, InvalidRequest, OutOfMemory
from dmabufd.heaps.backend import BackendKind, HeapBackend, round_to_page
from dmabufd.heaps.buffer import Buffer
from dmabufd.heaps.registry import Caller, HeapRegistry
from dmabufd.sessions.ledger import BufferRecord, Ledger, Reservation
from dmabufd.sessions.session import Session
from dmabufd.transport.outbox import Outgoing
from dmabufd_common.units import format_size

log = logging.getLogger(__name__)

# At most this many memfds are made on the event loop in one call (see
# never_blocks); larger batches go to a thread.
INLINE_MAX_BUFFERS = 8


def allocation_error(backend: HeapBackend, error: OSError) -> DmabufdError:
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in (errno.ENOMEM, errno.ENOSPC):
        return OutOfMemory(f"heap {backend.spec.name!r} is out of memory ({reason})")
    return HeapUnavailable(f"heap {backend.spec.name!r} failed to allocate: {reason}")


def allocate_all(backend: HeapBackend, sizes: list[int], name: str, *, prepared: bool = False) -> list[Buffer]:
    """Allocate one buffer per size, all or none. The caller owns one
    reference on each buffer returned. `prepared`: HeapBackend.allocate."""
    buffers: list[Buffer] = []
    try:
        for size in sizes:
            buffers.append(Buffer(backend.allocate(size, name, prepared=prepared)))
    except BaseException as error:
        for buffer in buffers:
            buffer.put()
        if isinstance(error, OSError):
            raise allocation_error(backend, error) from None
        raise
    return buffers


@dataclass
class Provision:
    """Buffers allocated and covered by quota, not yet booked or delivered.
    Until deliver() books them, the provision owns one reference on each."""

    backend: HeapBackend
    usage: str
    name: str
    reservation: Reservation
    buffers: list[Buffer]
    pool_id: int = 0


class BufferBroker:
    def __init__(self, config: Config, registry: HeapRegistry, ledger: Ledger) -> None:
        self._config = config
        self._registry = registry
        self._ledger = ledger
        self.max_buffer_bytes = config.heaps.max_buffer_bytes or physical_memory()
        self.max_batch = config.heaps.max_batch

    def caller(self, session: Session) -> Caller:
        return Caller(session.peer.uid, session.peer.gids)

    def pick(self, session: Session, heap: str, usage: str, npu_device: int | None = None) -> HeapBackend:
        return self._registry.resolve(heap, usage, self.caller(session), npu_device)

    def eligible(self, session: Session, heap: str, usage: str, npu_device: int | None = None) -> list[HeapBackend]:
        return self._registry.eligible(heap, usage, self.caller(session), npu_device)

    def never_blocks(self, backend: HeapBackend, count: int) -> bool:
        """Whether an allocation of `count` buffers from `backend` can run on
        the event loop: a few memfds cost a few microseconds of syscalls
        each; device heaps zero pages in the ioctl (milliseconds for large
        buffers) and go to a thread."""
        return count <= INLINE_MAX_BUFFERS and backend.spec.kind is BackendKind.MEMFD

    def largest_buffer(self, backend: HeapBackend) -> int:
        """The largest buffer `backend` may make here (daemon and heap limits)."""
        heap_limit = backend.spec.max_buffer_bytes
        return min(self.max_buffer_bytes, heap_limit) if heap_limit else self.max_buffer_bytes

    def check_size(self, backend: HeapBackend, size: int) -> int:
        """Validate one buffer size; returns it rounded to pages."""
        if size <= 0:
            raise InvalidRequest("size must be at least 1 byte")
        if size > self.max_buffer_bytes:
            raise InvalidRequest(
                f"size {size} bytes exceeds the largest buffer this daemon allows "
                f"({format_size(self.max_buffer_bytes)})"
            )
        heap_limit = backend.spec.max_buffer_bytes
        if heap_limit and size > heap_limit:
            raise InvalidRequest(
                f"heap {backend.spec.name!r} limits one buffer to {format_size(heap_limit)}; "
                "ask for smaller buffers, another heap, or raise the limit "
                "(udmabuf: /sys/module/udmabuf/parameters/size_limit_mb)"
            )
        return round_to_page(size)

    @contextlib.contextmanager
    def provision(
        self,
        session: Session,
        backend: HeapBackend,
        sizes: list[int],
        *,
        usage: str,
        label: str,
        reused: list[Buffer] | None = None,
        pool_id: int = 0,
        prepared: bool = False,
    ) -> Iterator[Provision]:
        """Reserve quota for one buffer per (page-rounded) size, taking the
        `reused` buffers (recycled, renamed here; their references move into
        the provision) for the first sizes and allocating the rest. Unless
        deliver() booked them, every buffer's reference is given back when
        the block ends."""
        name = kernel_name(session.peer.pid, label, usage or backend.spec.name)
        reused = reused or []
        for buffer in reused:
            buffer.allocation.rename(name)
            buffer.reinstate()
        try:
            with self._ledger.reserve(session, sizes) as reservation:
                fresh = allocate_all(backend, sizes[len(reused) :], name, prepared=prepared)
                provision = Provision(backend, usage, name, reservation, reused + fresh, pool_id)
                reused = []
                try:
                    yield provision
                finally:
                    if not reservation.records:
                        for buffer in provision.buffers:
                            buffer.put()
        finally:
            for buffer in reused:  # the reservation itself failed
                buffer.put()

    def deliver(self, session: Session, ticket: bytes, provision: Provision) -> list[BufferRecord]:
        """Book the buffers to the session and queue their fds."""
        buffers = [(buffer, provision.name) for buffer in provision.buffers]
        records = self._ledger.commit(
            provision.reservation, provision.backend.spec.name, provision.usage, buffers, provision.pool_id
        )
        try:
            session.outbox.deliver(ticket, [Outgoing(record.id, record.buffer) for record in records])
        except BaseException:
            # BufferNotFound: the session closed meanwhile and released them itself.
            with contextlib.suppress(BufferNotFound):
                self._ledger.release(session, [record.id for record in records], pool_id=provision.pool_id)
            raise
        return records

    def allocate(
        self,
        session: Session,
        ticket: bytes,
        *,
        backend: HeapBackend,
        size: int,
        count: int,
        usage: str,
        label: str,
    ) -> list[BufferRecord]:
        """Allocate from `backend` (the caller picked it, with pick())."""
        rounded = self.check_size(backend, size)
        if not 1 <= count <= self._config.heaps.max_batch:
            raise InvalidRequest(f"count must be between 1 and {self._config.heaps.max_batch}, not {count}")
        with self.provision(session, backend, [rounded] * count, usage=usage, label=label) as provision:
            records = self.deliver(session, ticket, provision)
        if log.isEnabledFor(logging.DEBUG):  # every allocation passes here: skip building the fields
            self._log_allocated(session, backend, count, rounded, records)
        return records

    @staticmethod
    def _log_allocated(
        session: Session, backend: HeapBackend, count: int, rounded: int, records: list[BufferRecord]
    ) -> None:
        log.debug(
            "session %d: %d x %d bytes from %s",
            session.id,
            count,
            rounded,
            backend.spec.name,
            extra={
                "session": session.id,
                "pid": session.peer.pid,
                "uid": session.peer.uid,
                "event": "allocated",
                "heap": backend.spec.name,
                "bytes": count * rounded,
                "buffer_ids": [record.id for record in records],
            },
        )
