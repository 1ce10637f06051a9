"""One load's copy: the lanes that move a file's bytes into its buffers.

Two kinds of lane run at once, on threads of the load's own pool:

- I/O lanes (`depth` of them): each takes the next chunk (in file order,
  or from each buffer in turn for methods that write into memfds:
  lane_order) and copies it with the load's method (methods.py), from the
  page cache when cachestat says the cache holds the whole chunk already,
  else from the device (O_DIRECT) with the unaligned ends buffered. Taking
  chunks from a shared cursor keeps `depth` requests in flight without a
  future per chunk.
- a populate lane, for memfd buffers filled through a mapping (the
  buffered-read method): it allocates the buffers' fresh pages ahead of the
  I/O lanes (MADV_POPULATE_WRITE on a window of the memfd, with
  MADV_HUGEPAGE first where huge pages are wanted), so that the cost of a
  fresh page (allocation, zeroing, the page-table entry of the fault) is
  paid on the other core while the I/O lanes wait for the device. The
  other methods write into the memfd (direct-read through a lane's bounce
  buffer, cached chunks with sendfile), which allocates each page as it
  fills it, with no zeroing or fault to move elsewhere; udmabuf's memfd
  pages exist from its creation and heap buffers are the kernel's. An I/O
  lane that overtakes it faults the pages itself: the lane only moves
  work, it is never needed.

Locking: the cursor, the parts list and the CPU total each sit under the
one `_lock`, taken for a few instructions, never across a syscall.
Cancellation and the first error stop every lane between two chunks.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from dmabufd.errors import LoadCancelled
from dmabufd.heaps.backend import Allocation, BackendKind
from dmabufd.loading import page_cache
from dmabufd.loading.method import Method, PartSource
from dmabufd.loading.methods import MAPS_MEMFD_PAGES, TRANSFERS, WRITES_INTO_MEMFDS, Piece, Source
from dmabufd_common import uapi

ProgressFn = Callable[[int], None]
CancelledFn = Callable[[], bool]
# Called from the I/O lanes once the file bytes [offset, offset + length)
# are all in their buffer (streamed models mark tensors ready with it).
LandedFn = Callable[[int, int], None]

# The populate lane works in windows of this size: large enough that a
# window's mmap and munmap cost nothing next to its pages, a multiple of
# the 2 MiB a transparent huge page needs.
POPULATE_WINDOW = 8 << 20


@dataclass(frozen=True)
class Lanes:
    """How a load moves its bytes (loading.<kind> in the config)."""

    chunk_bytes: int
    depth: int
    page_cache: bool
    populate: bool
    huge_pages: bool


@dataclass
class Moved:
    """What the lanes did: where each part came from, and their CPU time."""

    parts: list[tuple[Piece, PartSource]] = field(default_factory=list)
    cpu_seconds: float = 0.0
    populated_bytes: int = 0


def chunks(piece: Piece, chunk_bytes: int) -> list[Piece]:
    """Cut a piece at file offsets that are multiples of chunk_bytes."""
    out: list[Piece] = []
    position, end = piece.file_offset, piece.file_offset + piece.length
    shift = piece.buffer_offset - piece.file_offset
    while position < end:
        stop = min(end, (position // chunk_bytes + 1) * chunk_bytes)
        out.append(Piece(position, position + shift, stop - position))
        position = stop
    return out


def lane_order(work: list[tuple[Allocation, Piece]], method: Method) -> list[tuple[Allocation, Piece]]:
    """The order the I/O lanes take the chunks in: file order, except for
    methods that write into memfds, which take them from each buffer in
    turn. A memfd accepts one write at a time, so lanes all inside one
    buffer would queue on it; spread over several, they write at once."""
    if method not in WRITES_INTO_MEMFDS:
        return work
    by_buffer: dict[int, list[tuple[Allocation, Piece]]] = {}
    for item in work:
        by_buffer.setdefault(id(item[0]), []).append(item)
    queues = list(by_buffer.values())
    longest = max((len(queue) for queue in queues), default=0)
    return [queue[i] for i in range(longest) for queue in queues if i < len(queue)]


class Transfer:
    """Copies `work` (allocation, piece) pairs; run() once."""

    def __init__(
        self,
        source: Source,
        work: list[tuple[Allocation, Piece]],
        method: Method,
        lanes: Lanes,
        *,
        progress: ProgressFn,
        cancelled: CancelledFn,
        landed: LandedFn | None,
    ) -> None:
        self._source = source
        self._work = lane_order(work, method)
        self._copy = TRANSFERS[method]
        self._method = method
        self._lanes = lanes
        self._progress = progress
        self._cancelled = cancelled
        self._landed = landed
        self._stop = threading.Event()
        # Guards _next and _moved.
        self._lock = threading.Lock()
        self._next = 0
        self._moved = Moved()
        self.depth = max(1, min(lanes.depth, len(work)))

    def run(self) -> Moved:
        populate = self._populate_targets()
        workers = self.depth + (1 if populate else 0)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load") as pool:
            futures: list[Future[None]] = [pool.submit(self._io_lane) for _ in range(self.depth)]
            lane = pool.submit(self._populate_lane, populate) if populate else None
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            self._stop.set()  # the I/O is over (or failed): the populate lane has nothing left to do
            if failed is not None:
                wait(futures)
                if lane is not None:
                    wait([lane])
                error = failed.exception()
                assert error is not None
                raise error
            if lane is not None:
                lane.result()
        if self._cancelled():
            raise LoadCancelled("the load was cancelled")
        return self._moved

    # -- I/O lanes

    def _take(self) -> tuple[Allocation, Piece] | None:
        with self._lock:
            if self._next >= len(self._work) or self._stop.is_set():
                return None
            item = self._work[self._next]
            self._next += 1
            return item

    def _io_lane(self) -> None:
        began = time.thread_time()
        try:
            while (item := self._take()) is not None:
                if self._cancelled():
                    self._stop.set()
                    return
                allocation, piece = item
                cached = self._lanes.page_cache and page_cache.fully_cached(
                    self._source.buffered_fd, piece.file_offset, piece.length
                )
                parts = self._copy(self._source, allocation, piece, cached)
                with self._lock:
                    self._moved.parts.extend(parts)
                self._progress(piece.length)
                if self._landed is not None:
                    self._landed(piece.file_offset, piece.length)
        except BaseException:
            self._stop.set()
            raise
        finally:
            spent = time.thread_time() - began
            with self._lock:
                self._moved.cpu_seconds += spent

    # -- the populate lane

    def _populate_targets(self) -> list[Allocation]:
        if not self._lanes.populate or self._method not in MAPS_MEMFD_PAGES:
            return []
        seen: dict[int, Allocation] = {}
        for allocation, _ in self._work:
            if allocation.kind is BackendKind.MEMFD:
                seen.setdefault(id(allocation), allocation)
        return list(seen.values())

    def _populate_lane(self, targets: list[Allocation]) -> None:
        """Fault in every page of the memfd buffers, in file order, while the
        I/O lanes read. Errors stop the lane quietly: the I/O lanes then
        fault what is left themselves and meet the same error, with a
        proper report (ENOMEM, a quota)."""
        began = time.thread_time()
        populated = 0
        try:
            for allocation in targets:
                for start in range(0, allocation.size, POPULATE_WINDOW):
                    if self._stop.is_set():
                        return
                    length = min(POPULATE_WINDOW, allocation.size - start)
                    if not _populate(allocation.fd, start, length, self._lanes.huge_pages):
                        return
                    populated += length
        finally:
            spent = time.thread_time() - began
            with self._lock:
                self._moved.cpu_seconds += spent
                self._moved.populated_bytes += populated


def _populate(fd: int, start: int, length: int, huge_pages: bool) -> bool:
    """Allocate the pages of [start, start + length) of a memfd; False when
    the kernel refused (the caller stops populating). The kernel works
    with the GIL released (uapi.populate_shared), so the loop and the I/O
    lanes run meanwhile."""
    try:
        uapi.populate_shared(fd, start, length, huge_pages)
    except OSError as error:
        if error.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14 (no MADV_POPULATE_WRITE)
            return False
        try:
            os.posix_fallocate(fd, start, length)
        except OSError:
            return False
    return True


def merge(parts: list[tuple[Piece, PartSource]]) -> list[tuple[int, int, PartSource]]:
    """(file offset, length, source) in file order, neighbours of one source joined."""
    merged: list[tuple[int, int, PartSource]] = []
    for piece, where in sorted(parts, key=lambda part: part[0].file_offset):
        if merged and merged[-1][2] is where and merged[-1][0] + merged[-1][1] == piece.file_offset:
            offset, length, _ = merged[-1]
            merged[-1] = (offset, length + piece.length, where)
        else:
            merged.append((piece.file_offset, piece.length, where))
    return merged
