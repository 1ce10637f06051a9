"""A file load end to end.

Layout: the file range is cut into buffers no larger than the heap allows;
each buffer holds its bytes at a buffer offset congruent to their file
offset modulo 4 KiB (only the first buffer can start off zero), so direct
I/O applies to any range. Each buffer's bytes are then cut into chunks
(loading.chunk_bytes, per kind of buffer) that loading.parallelism I/O lanes
copy at once (transfer.py): syscalls release the GIL, so several requests
are in flight and the storage stays busy.

Cancellation is checked between chunks; a cancelled or failed load frees
every buffer it made. Nothing is booked or delivered until all bytes are in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import mmap
import os
import time
from dataclasses import dataclass, field

from dmabufd.broker import BufferBroker
from dmabufd.config import LoadingConfig
from dmabufd.errors import FileChanged, InvalidRequest, VerifyFailed
from dmabufd.heaps.backend import PAGE_SIZE, Allocation, BackendKind, HeapBackend, round_to_page
from dmabufd.heaps.reserve import MemfdReserve
from dmabufd.loading.method import Method, PartSource
from dmabufd.loading.methods import DIO_ALIGN, Piece, Source
from dmabufd.loading.source import SourceFile
from dmabufd.loading.transfer import CancelledFn, LandedFn, Lanes, Moved, ProgressFn, Transfer, chunks, merge
from dmabufd.sessions.ledger import BufferRecord
from dmabufd.sessions.session import Session
from dmabufd_common import uapi

log = logging.getLogger(__name__)

__all__ = ["CancelledFn", "FileLoader", "LandedFn", "LoadRequest", "ProgressFn", "TransferReport"]


@dataclass(frozen=True)
class LoadRequest:
    offset: int
    length: int
    heap: str
    usage: str
    label: str
    method: Method
    verify: bool
    max_buffer_bytes: int
    # The NPU the buffers are for (dma_heap.json's per-NPU routes); None: any.
    npu_device: int | None = None


@dataclass(frozen=True)
class BufferPlan:
    """One buffer of a load: `piece` says which file bytes go where."""

    piece: Piece
    size: int


@dataclass
class TransferReport:
    method: Method
    wall_seconds: float
    cpu_seconds: float
    parallelism: int
    verified: bool
    # (file offset, length, where from), in file order.
    parts: list[tuple[int, int, PartSource]] = field(default_factory=list)
    # Bytes of the buffers that were prepared memfds (heaps/reserve.py).
    prepared_bytes: int = 0

    @property
    def bytes_from_cache(self) -> int:
        return sum(length for _, length, where in self.parts if where is PartSource.PAGE_CACHE)


@dataclass
class LoadOutcome:
    records: list[BufferRecord]
    plans: list[BufferPlan]
    report: TransferReport
    bytes: int


def plan_buffers(offset: int, length: int, largest: int, most: int) -> list[BufferPlan]:
    """Cut [offset, offset + length) into buffers of at most `largest`
    bytes, at most `most` of them (else InvalidRequest)."""
    largest = largest // PAGE_SIZE * PAGE_SIZE
    if largest < 2 * DIO_ALIGN:
        raise InvalidRequest(f"buffers of at most {largest} bytes are too small to load into")
    # Counted before any plan is made: a sparse file may claim exabytes.
    # Each buffer but the first starts aligned and holds `largest` bytes.
    needed = 1 + -(-max(0, length - (largest - offset % DIO_ALIGN)) // largest)
    if needed > most:
        raise InvalidRequest(
            f"{length} bytes in buffers of at most {largest} bytes need {needed} buffers; "
            f"a call may make {most}: allow larger buffers or load less"
        )
    plans: list[BufferPlan] = []
    position, end = offset, offset + length
    while position < end:
        buffer_offset = position % DIO_ALIGN
        count = min(end - position, largest - buffer_offset)
        plans.append(BufferPlan(Piece(position, buffer_offset, count), round_to_page(buffer_offset + count)))
        position += count
    return plans


# What the kernel answers for an exporter without direct copy_file_range.
EXPORTER_REFUSES = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP})

# Fastest first: how auto ranks the heaps of a usage route for a load.
SPEED_RANK = (Method.DIRECT_CFR, Method.DIRECT_READ, Method.SPLICE, Method.SENDFILE, Method.BUFFERED_READ)


def choose_heap(candidates: list[HeapBackend], requested: Method, source: SourceFile) -> HeapBackend:
    """For a load by usage: the route's heap with the fastest method for
    this file (route order breaks ties). On a stock kernel that prefers an
    O_DIRECT read into a udmabuf's memfd over a buffered read into a heap
    buffer; on the product kernel, direct copy_file_range into the first heap."""
    if requested is not Method.AUTO or len(candidates) == 1:
        return candidates[0]

    def rank(backend: HeapBackend) -> int:
        return SPEED_RANK.index(choose_method(backend, Method.AUTO, source))

    return min(candidates, key=rank)


def choose_method(backend: HeapBackend, requested: Method, source: SourceFile) -> Method:
    supported = backend.load_methods
    if requested is not Method.AUTO:
        if requested not in supported:
            names = ", ".join(method.label for method in supported)
            raise InvalidRequest(
                f"method {requested.label} does not work into heap {backend.spec.name!r} on this kernel; "
                f"it supports: {names}"
            )
        if requested is Method.DIRECT_CFR and not source.block_backed:
            raise InvalidRequest(
                f"method {requested.label} needs a file on a block device (ext4, f2fs...); "
                f"{source.description} is on a memory, network or pseudo file system"
            )
        return requested
    for method in supported:
        if method is Method.DIRECT_CFR and not source.block_backed:
            continue  # the kernel copies only with files on a block device (EXDEV otherwise)
        if method is Method.DIRECT_READ and source.direct_fd is None:
            continue  # the file system does no O_DIRECT: a buffered method is as good and simpler
        return method
    return Method.BUFFERED_READ


def _digest_of_file(fd: int, piece: Piece) -> bytes:
    """SHA-256 of the file bytes `piece` covers, read with preadv. Never a
    mapping: the file is the client's, and a client that truncates it under
    a mapping would kill the daemon with SIGBUS; a read just comes up short."""
    chunk_bytes = 1 << 20
    digest = hashlib.sha256()
    # One buffer for the whole piece, so verifying does not allocate per chunk.
    chunk = bytearray(min(chunk_bytes, piece.length))
    with memoryview(chunk) as view:
        position, end = piece.file_offset, piece.file_offset + piece.length
        while position < end:
            count = os.preadv(fd, [view[: min(len(view), end - position)]], position)
            if count == 0:
                # A short read just loops for the rest; only end of file gives 0.
                raise FileChanged("the file shrank while it was being verified")
            digest.update(view[:count])
            position += count
    return digest.digest()


def _digest_of_buffer(allocation: Allocation, piece: Piece) -> bytes:
    sync = allocation.kind is not BackendKind.MEMFD
    with mmap.mmap(allocation.fd, allocation.size, prot=mmap.PROT_READ) as region:
        if sync:
            uapi.dma_buf_sync(allocation.fd, uapi.SyncFlags.START | uapi.SyncFlags.READ)
        view = memoryview(region)[piece.buffer_offset : piece.buffer_offset + piece.length]
        digest = hashlib.sha256(view).digest()
        view.release()
        if sync:
            uapi.dma_buf_sync(allocation.fd, uapi.SyncFlags.END | uapi.SyncFlags.READ)
    return digest


class FileLoader:
    def __init__(self, config: LoadingConfig, broker: BufferBroker, reserve: MemfdReserve | None = None) -> None:
        """`reserve`: the memfd reserve, which prepares no memfd while a
        load moves bytes (heaps/reserve.py)."""
        self._config = config
        self._broker = broker
        self._reserve = reserve

    def transfer(
        self,
        source: SourceFile,
        backend: HeapBackend,
        targets: list[tuple[Allocation, BufferPlan]],
        method: Method,
        *,
        progress: ProgressFn,
        cancelled: CancelledFn,
        verify: bool,
        fallback: bool,
        landed: LandedFn | None = None,
    ) -> TransferReport:
        """Copy every plan's bytes into its allocation (transfer.py says how).
        The caller holds the reserve (moving_bytes()) from the allocation on.

        The probe cannot tell an exporter without direct copy_file_range
        from one with it (the kernel answers EXDEV for the probe's memfd
        first), so the first load into such a heap meets EOPNOTSUPP: the
        heap loses the method for good and the load runs again, whole, by
        the next method (what was copied is simply copied over). Without
        `fallback` (the client named the method) the load fails instead."""
        lanes = self.lanes(backend.spec.kind)
        if not source.page_cache_visible:  # what the page cache holds is not the client's to learn
            lanes = dataclasses.replace(lanes, page_cache=False)
        work = [(allocation, chunk) for allocation, plan in targets for chunk in chunks(plan.piece, lanes.chunk_bytes)]

        def run(chosen: Method) -> tuple[Moved, int]:
            copy = Transfer(
                Source(source.buffered_fd, source.direct_fd),
                work,
                chosen,
                lanes,
                progress=progress,
                cancelled=cancelled,
                landed=landed,
            )
            return copy.run(), copy.depth

        started = time.monotonic()
        try:
            moved, depth = run(method)
        except OSError as error:
            if method is not Method.DIRECT_CFR or error.errno not in EXPORTER_REFUSES:
                raise
            # One tuple store: loads reading load_methods at once see the old or the new one.
            backend.load_methods = tuple(m for m in backend.load_methods if m is not Method.DIRECT_CFR)
            if not fallback:
                raise InvalidRequest(
                    f"method {method.label} does not work into heap {backend.spec.name!r}: its exporter "
                    f"refuses it ({os.strerror(error.errno)}); leave the method to the daemon"
                ) from error
            method = choose_method(backend, Method.AUTO, source)
            log.warning(
                "heap %s: its exporter refuses direct copy_file_range (%s); loads into it use %s",
                backend.spec.name,
                os.strerror(error.errno),
                method.label,
            )
            moved, depth = run(method)
        wall = time.monotonic() - started
        needed = max((p.piece.file_offset + p.piece.length for _, p in targets), default=0)
        source.check_unchanged(needed)  # one fstat: truncated, or otherwise changed
        cpu = moved.cpu_seconds
        if verify:
            began = time.thread_time()
            self.verify(source, targets)
            cpu += time.thread_time() - began
        prepared = sum(allocation.size for allocation, _ in targets if allocation.prepared)
        return TransferReport(method, wall, cpu, depth, verify, merge(moved.parts), prepared)

    def moving_bytes(self) -> contextlib.AbstractContextManager[None]:
        """The reserve prepares no memfd meanwhile (heaps/reserve.py): held
        from the take of a load's prepared memfds to its last byte."""
        return self._reserve.held() if self._reserve is not None else contextlib.nullcontext()

    def lanes(self, kind: BackendKind) -> Lanes:
        profile = self._config.profile(kind.name.lower().replace("_", "-"))
        return Lanes(
            chunk_bytes=profile.chunk_bytes,
            depth=profile.parallelism,
            page_cache=self._config.page_cache,
        )

    @staticmethod
    def verify(source: SourceFile, targets: list[tuple[Allocation, BufferPlan]]) -> None:
        """Compare every plan's bytes in its buffer with the file's (SHA-256)."""
        for allocation, plan in targets:
            if _digest_of_file(source.buffered_fd, plan.piece) != _digest_of_buffer(allocation, plan.piece):
                raise VerifyFailed(
                    f"bytes at file offset {plan.piece.file_offset} differ from the file's; "
                    "the file may have changed while loading"
                )

    def load(
        self,
        session: Session,
        ticket: bytes,
        source: SourceFile,
        request: LoadRequest,
        *,
        progress: ProgressFn,
        cancelled: CancelledFn,
    ) -> LoadOutcome:
        offset, length = source.check_range(request.offset, request.length)
        candidates = self._broker.eligible(session, request.heap, request.usage, request.npu_device)
        backend = choose_heap(candidates, request.method, source)
        method = choose_method(backend, request.method, source)
        largest = self._broker.largest_buffer(backend)
        if request.max_buffer_bytes:
            largest = min(largest, request.max_buffer_bytes)
        plans = plan_buffers(offset, length, largest, self._broker.max_batch)
        began_cpu = time.thread_time()
        started = time.monotonic()
        sizes = [plan.size for plan in plans]
        with (
            self.moving_bytes(),
            self._broker.provision(
                session, backend, sizes, usage=request.usage, label=request.label, prepared=True
            ) as provision,
        ):
            allocation_seconds = time.monotonic() - started
            report = self.transfer(
                source,
                backend,
                [(buffer.allocation, plan) for buffer, plan in zip(provision.buffers, plans, strict=True)],
                method,
                progress=progress,
                cancelled=cancelled,
                verify=request.verify,
                fallback=request.method is Method.AUTO,
            )
            records = self._broker.deliver(session, ticket, provision)
        # Wall time is creation plus I/O, as the seed benchmark counts it
        # (verification, when asked for, is not part of it).
        report.wall_seconds += allocation_seconds
        report.cpu_seconds += time.thread_time() - began_cpu
        log.info(
            "session %d: loaded %d bytes into %d %s buffer(s) by %s in %.3f s (cpu %.3f s, %d in flight)",
            session.id,
            length,
            len(records),
            backend.spec.name,
            method.label,
            report.wall_seconds,
            report.cpu_seconds,
            report.parallelism,
            extra={
                "session": session.id,
                "pid": session.peer.pid,
                "uid": session.peer.uid,
                "event": "loaded",
                "heap": backend.spec.name,
                "bytes": length,
                "buffer_ids": [record.id for record in records],
                "method": method.label,
                "duration_s": round(report.wall_seconds, 6),
                "cpu_s": round(report.cpu_seconds, 6),
            },
        )
        return LoadOutcome(records, plans, report, length)
