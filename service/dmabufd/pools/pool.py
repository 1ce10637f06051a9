"""Image pools for camera pipelines.

A pool is N frames of one format. A frame is one buffer holding every
plane at its offset, or (buffer_per_plane) one buffer per plane, as the
V4L2 multi-planar API may want. The layout maths (strides, plane sizes)
is the one V4L2 and DRM define; it lives in dmabufd_common.formats and is
shared with the camera client.

A pool's buffers are ordinary booked buffers of the session (quota,
stats); the pool only groups them. Releasing the pool releases them all.

Recycling: a pool allocated with `recycle` goes, on release, into a warm
cache keyed by (uid, heap, format, frame layout) instead of being freed,
so a pipeline that restarts gets its buffers back without allocating. The
cache gives buffers back only to the same uid (old frames are not
scrubbed), only whole frames that no process of the uid still holds (the
ledger's release), whose buffers never went to a grant receiver or got
seals they were not made with (Buffer.reusable()), and only within
pools.recycle_budget_bytes; anything else is freed.

Lifetime: a pool's buffers are ordinary ledger records (pool_id set), so
they can be released only with the pool. The warm cache owns one reference
on each buffer it keeps; allocate() hands those to the new pool's
provision.

Locking: _lock guards the tables; it is a leaf lock (allocation, /proc
reads and put() run outside it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dmabufd.broker import BufferBroker
from dmabufd.errors import BufferNotFound, InvalidRequest
from dmabufd.heaps.backend import round_to_page
from dmabufd.heaps.buffer import Buffer
from dmabufd.sessions.ledger import BufferRecord, Ledger
from dmabufd.sessions.session import Session

log = logging.getLogger(__name__)

MAX_POOL_FRAMES = 64


class PlaneSpec(Protocol):
    @property
    def offset(self) -> int: ...
    @property
    def stride(self) -> int: ...
    @property
    def size(self) -> int: ...


class LayoutSpec(Protocol):
    @property
    def size(self) -> int: ...
    @property
    def multi_planar(self) -> bool: ...
    @property
    def planes(self) -> Sequence[PlaneSpec]: ...


LayoutFn = Callable[[str, int, int, int], LayoutSpec]


@dataclass(frozen=True)
class FormatKey:
    fourcc: str
    width: int
    height: int
    stride_align: int


@dataclass(frozen=True)
class PlanePlacement:
    buffer_index: int
    offset: int
    stride: int
    size: int


@dataclass
class Pool:
    id: int
    session_id: int
    uid: int
    heap: str
    format: FormatKey
    placements: list[PlanePlacement]
    frame_bytes: int
    frames: list[list[BufferRecord]]
    recycle: bool
    recycled: bool
    allocation_seconds: float

    @property
    def records(self) -> list[BufferRecord]:
        return [record for frame in self.frames for record in frame]


WarmKey = tuple[int, str, FormatKey, tuple[int, ...]]


def plan_frame(layout: LayoutSpec, buffer_per_plane: bool) -> tuple[list[PlanePlacement], list[int]]:
    """The planes' placement and the frame's buffer sizes (page-rounded)."""
    if not buffer_per_plane:
        placements = [PlanePlacement(0, plane.offset, plane.stride, plane.size) for plane in layout.planes]
        return placements, [round_to_page(layout.size)]
    placements = [PlanePlacement(index, 0, plane.stride, plane.size) for index, plane in enumerate(layout.planes)]
    return placements, [round_to_page(plane.size) for plane in layout.planes]


class PoolTable:
    def __init__(self, broker: BufferBroker, ledger: Ledger, layout: LayoutFn, recycle_budget_bytes: int) -> None:
        self._broker = broker
        self._ledger = ledger
        self._layout = layout
        self._budget = recycle_budget_bytes
        self._lock = threading.Lock()
        self._pools: dict[int, Pool] = {}
        self._warm: dict[WarmKey, list[list[Buffer]]] = {}
        self._next_id = 1

    def _warm_bytes(self) -> int:
        return sum(b.size for frames in self._warm.values() for frame in frames for b in frame)

    def allocate(
        self,
        session: Session,
        ticket: bytes,
        *,
        image: FormatKey,
        count: int,
        buffer_per_plane: bool,
        heap: str,
        usage: str,
        label: str,
        recycle: bool,
    ) -> Pool:
        if not 1 <= count <= MAX_POOL_FRAMES:
            raise InvalidRequest(f"a pool has between 1 and {MAX_POOL_FRAMES} frames, not {count}")
        try:
            layout = self._layout(image.fourcc, image.width, image.height, image.stride_align)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        usage = usage or "camera"
        backend = self._broker.pick(session, heap, usage)
        # V4L2 capture cannot put two planes of a multi-planar format in one
        # dma-buf (it ignores the data_offset a capture queue is given), so
        # those formats always get a buffer per plane.
        placements, sizes = plan_frame(layout, buffer_per_plane or layout.multi_planar)
        for size in sizes:
            self._broker.check_size(backend, size)
        key: WarmKey = (session.peer.uid, backend.spec.name, image, tuple(sizes))
        started = time.monotonic()
        with self._lock:
            pool_id = self._next_id
            self._next_id += 1
            warm = self._warm.get(key, [])
            reused, self._warm[key] = warm[:count], warm[count:]
            if not self._warm[key]:
                del self._warm[key]
        # The provision takes over the warm cache's references; on failure
        # it frees them (a failed pool is not worth keeping warm).
        with self._broker.provision(
            session,
            backend,
            sizes * count,
            usage=usage,
            label=label,
            reused=[buffer for frame in reused for buffer in frame],
            pool_id=pool_id,
        ) as provision:
            records = self._broker.deliver(session, ticket, provision)
        seconds = time.monotonic() - started
        per_frame = len(sizes)
        frames = [records[i : i + per_frame] for i in range(0, len(records), per_frame)]
        with self._lock:
            pool = Pool(
                id=pool_id,
                session_id=session.id,
                uid=session.peer.uid,
                heap=backend.spec.name,
                format=image,
                placements=placements,
                frame_bytes=layout.size,
                frames=frames,
                recycle=recycle,
                recycled=bool(reused) and len(reused) == count,
                allocation_seconds=seconds,
            )
            self._pools[pool.id] = pool
            if session.closed:
                # The session ended as the pool was made: its clean-up has
                # released the buffers and may have looked for pools already.
                del self._pools[pool.id]
        log.info(
            "session %d: pool %d, %d x %s %dx%d on %s in %.2f ms%s",
            session.id,
            pool.id,
            count,
            image.fourcc,
            image.width,
            image.height,
            backend.spec.name,
            seconds * 1e3,
            f" ({len(reused)} frames recycled)" if reused else "",
        )
        return pool

    def find(self, session: Session, pool_id: int) -> Pool:
        with self._lock:
            pool = self._pools.get(pool_id)
        if pool is None or pool.session_id != session.id:
            raise BufferNotFound(f"this session holds no pool with id {pool_id}")
        return pool

    def get(self, pool_id: int) -> Pool | None:
        """The pool, whoever holds it (a grant's receiver describes it)."""
        with self._lock:
            return self._pools.get(pool_id)

    def release(self, session: Session, pool_id: int) -> int:
        """Release a pool's buffers from the books, recycling them if asked
        and safe."""
        pool = self.find(session, pool_id)
        with self._lock:
            del self._pools[pool.id]
        released, returned = self._ledger.release(
            session, [r.id for r in pool.records], pool_id=pool.id, keep=pool.recycle
        )
        self._retire(pool, returned)
        return released

    def release_session(self, session: Session) -> None:
        """Called as the session ends, before the ledger releases the rest."""
        with self._lock:
            pools = [p for p in self._pools.values() if p.session_id == session.id]
            for pool in pools:
                del self._pools[pool.id]
        for pool in pools:
            try:
                _, returned = self._ledger.release(
                    session, [r.id for r in pool.records], pool_id=pool.id, keep=pool.recycle
                )
            except BufferNotFound:
                continue
            self._retire(pool, returned)

    def _retire(self, pool: Pool, returned: list[BufferRecord]) -> None:
        """Recycle or free a released pool's buffers. `returned` are the
        records whose references the ledger handed back (the buffers no
        process of the owner's uid or of a grant receiver's still holds);
        only whole frames whose buffers all came back and are all
        reusable are kept warm."""
        if not returned:
            return
        back = {record.id: record.buffer for record in returned}
        frames = [
            [back[record.id] for record in frame]
            for frame in pool.frames
            if all(record.id in back and back[record.id].reusable() for record in frame)
        ]
        size = sum(buffer.size for frame in frames for buffer in frame)
        key: WarmKey = (pool.uid, pool.heap, pool.format, tuple(record.size for record in pool.frames[0]))
        with self._lock:
            keep = bool(frames) and self._warm_bytes() + size <= self._budget
            if keep:
                self._warm.setdefault(key, []).extend(frames)
        kept = {id(buffer) for frame in frames for buffer in frame} if keep else set()
        for record in returned:
            if id(record.buffer) not in kept:
                record.buffer.put()
        log.debug("pool %d %s", pool.id, "kept warm" if keep else "freed")

    def warm(self) -> tuple[int, int]:
        """(frames, bytes) kept warm."""
        with self._lock:
            return sum(len(frames) for frames in self._warm.values()), self._warm_bytes()

    def close(self) -> None:
        with self._lock:
            warm, self._warm = self._warm, {}
        for frames in warm.values():
            for frame in frames:
                for buffer in frame:
                    buffer.put()
