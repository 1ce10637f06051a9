"""Allocation end to end: pick a heap, check sizes, reserve quota,
allocate, book, deliver the fds. The one place those steps live; the gRPC
layer and the file loader only call them.

Failure at any step undoes the steps before it: buffers allocated but not
booked are closed, booked but not delivered are released, and the quota
reservation returns what was not kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from dmabufd.api.naming import kernel_name
from dmabufd.config import Config
from dmabufd.errors import BufferNotFound, DmabufdError, HeapUnavailable, InvalidRequest, OutOfMemory
from dmabufd.heaps.backend import Allocation, HeapBackend, round_to_page
from dmabufd.heaps.registry import Caller, HeapRegistry
from dmabufd.sessions.ledger import BufferRecord, Ledger, Reservation
from dmabufd.sessions.session import Session
from dmabufd_common.units import format_size

log = logging.getLogger(__name__)


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def allocation_error(backend: HeapBackend, error: OSError) -> DmabufdError:
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in (errno.ENOMEM, errno.ENOSPC):
        return OutOfMemory(f"heap {backend.spec.name!r} is out of memory ({reason})")
    return HeapUnavailable(f"heap {backend.spec.name!r} failed to allocate: {reason}")


def allocate_all(backend: HeapBackend, sizes: list[int], name: str) -> list[Allocation]:
    """Allocate one buffer per size, all or none."""
    allocations: list[Allocation] = []
    try:
        for size in sizes:
            allocations.append(backend.allocate(size, name))
    except BaseException as error:
        for allocation in allocations:
            allocation.close()
        if isinstance(error, OSError):
            raise allocation_error(backend, error) from None
        raise
    return allocations


@dataclass
class Provision:
    """Buffers allocated and covered by quota, not yet booked or delivered."""

    backend: HeapBackend
    usage: str
    name: str
    reservation: Reservation
    allocations: list[Allocation]


class BufferBroker:
    def __init__(self, config: Config, registry: HeapRegistry, ledger: Ledger) -> None:
        self._config = config
        self._registry = registry
        self._ledger = ledger
        self.max_buffer_bytes = config.heaps.max_buffer_bytes or physical_memory()
        self.max_batch = config.heaps.max_batch

    def caller(self, session: Session) -> Caller:
        return Caller(session.peer.uid, session.peer.gids)

    def pick(self, session: Session, heap: str, usage: str) -> HeapBackend:
        return self._registry.resolve(heap, usage, self.caller(session))

    def eligible(self, session: Session, heap: str, usage: str) -> list[HeapBackend]:
        return self._registry.eligible(heap, usage, self.caller(session))

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
        reused: list[Allocation] | None = None,
    ) -> Iterator[Provision]:
        """Reserve quota for one buffer per (page-rounded) size, taking the
        `reused` allocations (recycled, renamed here) for the first sizes
        and allocating the rest. Unless deliver() took them, the new ones
        are freed when the block ends; the reused ones stay the caller's."""
        name = kernel_name(session.peer.pid, label, usage or backend.spec.name)
        reused = reused or []
        with self._ledger.reserve(session, sizes) as reservation:
            fresh = allocate_all(backend, sizes[len(reused) :], name)
            for allocation in reused:
                allocation.rename(name)
            provision = Provision(backend, usage, name, reservation, reused + fresh)
            try:
                yield provision
            finally:
                if not reservation.records:
                    for allocation in fresh:
                        allocation.close()

    def deliver(self, session: Session, ticket: bytes, provision: Provision) -> list[BufferRecord]:
        """Book the buffers to the session and send their fds."""
        allocations = [(allocation, provision.name) for allocation in provision.allocations]
        records = self._ledger.commit(provision.reservation, provision.backend.spec.name, provision.usage, allocations)
        try:
            session.sender.send_fds(ticket, [r.id for r in records], [r.allocation.fd for r in records])
        except BaseException:
            # BufferNotFound: the session closed meanwhile and released them itself.
            with contextlib.suppress(BufferNotFound):
                self._ledger.release(session, [record.id for record in records])
            raise
        return records

    def allocate(
        self, session: Session, ticket: bytes, *, size: int, count: int, heap: str, usage: str, label: str
    ) -> list[BufferRecord]:
        backend = self.pick(session, heap, usage)
        rounded = self.check_size(backend, size)
        if not 1 <= count <= self._config.heaps.max_batch:
            raise InvalidRequest(f"count must be between 1 and {self._config.heaps.max_batch}, not {count}")
        with self.provision(session, backend, [rounded] * count, usage=usage, label=label) as provision:
            records = self.deliver(session, ticket, provision)
        log.debug("session %d: %d x %d bytes from %s", session.id, count, rounded, backend.spec.name)
        return records
