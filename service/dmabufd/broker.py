"""Allocation end to end: validate, pick a heap, reserve quota, allocate,
book, deliver the fds. The one place that sequence lives; the gRPC layer
only translates to and from it.

Failure at any step undoes the steps before it: buffers allocated but not
booked are closed, booked but not delivered are released, and the quota
reservation returns what was not kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

from dmabufd.api.naming import kernel_name
from dmabufd.config import Config
from dmabufd.errors import BufferNotFound, DmabufdError, HeapUnavailable, InvalidRequest, OutOfMemory
from dmabufd.heaps.backend import Allocation, HeapBackend, round_to_page
from dmabufd.heaps.registry import Caller, HeapRegistry
from dmabufd.sessions.ledger import BufferRecord, Ledger
from dmabufd.sessions.session import Session
from dmabufd_common.units import format_size

log = logging.getLogger(__name__)


def physical_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _allocation_error(backend: HeapBackend, error: OSError) -> DmabufdError:
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in (errno.ENOMEM, errno.ENOSPC):
        return OutOfMemory(f"heap {backend.spec.name!r} is out of memory ({reason})")
    return HeapUnavailable(f"heap {backend.spec.name!r} failed to allocate: {reason}")


class BufferBroker:
    def __init__(self, config: Config, registry: HeapRegistry, ledger: Ledger) -> None:
        self._config = config
        self._registry = registry
        self._ledger = ledger
        self.max_buffer_bytes = config.heaps.max_buffer_bytes or physical_memory()

    def caller(self, session: Session) -> Caller:
        return Caller(session.peer.uid, session.peer.gids)

    def _check_request(self, size: int, count: int, backend: HeapBackend) -> int:
        if size <= 0:
            raise InvalidRequest("size must be at least 1 byte")
        limit = self.max_buffer_bytes
        if size > limit:
            raise InvalidRequest(
                f"size {size} bytes exceeds the largest buffer this daemon allows ({format_size(limit)})"
            )
        heap_limit = backend.spec.max_buffer_bytes
        if heap_limit and size > heap_limit:
            raise InvalidRequest(
                f"heap {backend.spec.name!r} limits one buffer to {format_size(heap_limit)}; "
                "ask for smaller buffers, another heap, or raise the limit "
                "(udmabuf: /sys/module/udmabuf/parameters/size_limit_mb)"
            )
        if not 1 <= count <= self._config.heaps.max_batch:
            raise InvalidRequest(f"count must be between 1 and {self._config.heaps.max_batch}, not {count}")
        return round_to_page(size)

    def allocate(
        self, session: Session, ticket: bytes, *, size: int, count: int, heap: str, usage: str, label: str
    ) -> list[BufferRecord]:
        backend = self._registry.resolve(heap, usage, self.caller(session))
        rounded = self._check_request(size, count, backend)
        name = kernel_name(session.peer.pid, label, usage or backend.spec.name)
        with self._ledger.reserve(session, count, rounded) as reservation:
            allocations: list[tuple[Allocation, str]] = []
            try:
                for _ in range(count):
                    allocations.append((backend.allocate(rounded, name), name))
            except OSError as error:
                for allocation, _ in allocations:
                    allocation.close()
                raise _allocation_error(backend, error) from None
            except BaseException:
                for allocation, _ in allocations:
                    allocation.close()
                raise
            records = self._ledger.commit(reservation, backend.spec.name, usage, allocations)
        try:
            session.sender.send_fds(ticket, [r.id for r in records], [r.allocation.fd for r in records])
        except BaseException:
            # BufferNotFound: the session closed meanwhile and released them itself.
            with contextlib.suppress(BufferNotFound):
                self._ledger.release(session, [record.id for record in records])
            raise
        log.debug("session %d: %d x %d bytes from %s", session.id, count, rounded, backend.spec.name)
        return records
