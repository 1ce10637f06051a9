"""One load's copy: the lanes that move a file's bytes into its buffers.

`depth` I/O lanes run at once, on threads of the load's own pool: each
takes the next chunk (in file order, or from each buffer in turn for
methods that write into memfds: lane_order) and copies it with the load's
method (methods.py), from the page cache when cachestat says the cache
holds the whole chunk already, else from the device (O_DIRECT) with the
unaligned ends buffered. Taking chunks from a shared cursor keeps `depth`
requests in flight without a future per chunk.

Locking: the cursor, the parts list and the CPU total each sit under the
one `_lock`, taken for a few instructions, never across a syscall.
Cancellation and the first error stop every lane between two chunks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from dmabufd.errors import LoadCancelled
from dmabufd.heaps.backend import Allocation
from dmabufd.loading import page_cache
from dmabufd.loading.method import Method, PartSource
from dmabufd.loading.methods import TRANSFERS, Piece, Source, writes_into_memfds

ProgressFn = Callable[[int], None]
CancelledFn = Callable[[], bool]
# Called from the I/O lanes once the file bytes [offset, offset + length)
# are all in their buffer (streamed models mark tensors ready with it).
LandedFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Lanes:
    """How a load moves its bytes (loading.<kind> in the config)."""

    chunk_bytes: int
    depth: int
    page_cache: bool


@dataclass
class Moved:
    """What the lanes did: where each part came from, and their CPU time."""

    parts: list[tuple[Piece, PartSource]] = field(default_factory=list)
    cpu_seconds: float = 0.0


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
    """The order the I/O lanes take the chunks in: file order, except where
    they write into memfds (methods.writes_into_memfds), where they take
    them from each buffer in turn. A memfd accepts one write at a time, so
    lanes all inside one buffer would queue on it; spread over several,
    they write at once."""
    if not work or not writes_into_memfds(method, work[0][0].kind):
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
        with ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="load") as pool:
            futures: list[Future[None]] = [pool.submit(self._io_lane) for _ in range(self.depth)]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                self._stop.set()
                wait(futures)
                error = failed.exception()
                assert error is not None
                raise error
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
