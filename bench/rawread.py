"""A raw O_DIRECT reader for bench.compare, written without any of dmabufd's code: `depth` threads,
each taking the next `block`-byte chunk of the file and preadv-ing it, so that `depth` requests
are in flight, as fio's iodepth keeps them.

Two kinds of destination, because they cost different things:

- "reused": one anonymous buffer per thread, allocated and touched once before any pass, so
  the I/O lands in memory that is already there. This is what fio measures.
- "fresh": a new memfd the size of the file, mapped and read into, made inside the timed
  section and closed after it. Every page is allocated (and zeroed) by the kernel while the
  reads pin it, which is what dmabufd pays when it loads a file into a new memfd buffer.

os.preadv releases the GIL, so the threads' requests really overlap.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
import time
from dataclasses import dataclass

from bench.system import cpu_seconds
from bench.testfile import BLOCK, pattern_bytes

MEMORY_KINDS = ("reused", "fresh")
_SAMPLE = 64


class RawReadError(Exception):
    """A read came back short or the bytes read are not the file's."""


@dataclass(frozen=True)
class RawPass:
    wall_s: float  # the reads (fresh: also creating and mapping the memfd)
    cpu_s: float  # this process's user+sys over the same section, all threads
    release_s: float  # fresh: munmap + close of the memfd, after the clock stopped
    samples_checked: int


class ReusedBuffers:
    """One `block`-byte anonymous buffer per thread, faulted in once."""

    def __init__(self, depth: int, block: int) -> None:
        self.block = block
        self.regions = [mmap.mmap(-1, block) for _ in range(depth)]
        for region in self.regions:
            # Fault every page in now: fio's buffers are ready before its clock starts.
            for offset in range(0, block, mmap.PAGESIZE):
                region[offset] = 0

    def close(self) -> None:
        for region in self.regions:
            region.close()
        self.regions = []


def _read_fully(fd: int, target: memoryview, offset: int) -> None:
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], offset + done)
        if count <= 0:
            raise RawReadError(f"short O_DIRECT read at {offset + done}")
        done += count


class ReadOne:
    """Reads the chunk at a file offset into the destination of a thread slot; remembers what
    each slot read last, for the sample check."""

    def __init__(self, fd: int, size: int, block: int, views: list[memoryview], fresh: memoryview | None) -> None:
        self.fd, self.size, self.block = fd, size, block
        self.views, self.fresh = views, fresh
        self.last: dict[int, int] = {}

    def __call__(self, slot: int, offset: int) -> None:
        length = min(self.block, self.size - offset)
        if self.fresh is not None:
            _read_fully(self.fd, self.fresh[offset : offset + length], offset)
        else:
            _read_fully(self.fd, self.views[slot][:length], offset)
            self.last[slot] = offset


def _run_threads(depth: int, work: list[int], read_one: ReadOne) -> None:
    indexes = itertools.count()  # next() on a count is atomic under the GIL
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            while (index := next(indexes)) < len(work) and not errors:
                read_one(slot, work[index])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(slot,), name=f"raw-read-{slot}") for slot in range(depth)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def read_direct(path: os.PathLike[str], size: int, block: int, depth: int, reused: ReusedBuffers | None) -> RawPass:
    """Read the first `size` bytes of the pattern file at `path` with O_DIRECT, `depth` chunks in
    flight, into `reused` buffers or (None) a fresh memfd. Checks a few pattern bytes after."""
    if size % BLOCK or block % BLOCK:
        raise ValueError(f"size and block must be multiples of {BLOCK} for O_DIRECT")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    offsets = list(range(0, size, block))
    memfd = -1
    region: mmap.mmap | None = None
    fresh: memoryview | None = None
    views = [memoryview(r) for r in reused.regions] if reused is not None else []
    try:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        if reused is None:
            memfd = os.memfd_create("bench-raw", os.MFD_CLOEXEC)
            os.ftruncate(memfd, size)
            region = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            fresh = memoryview(region)
        read_one = ReadOne(fd, size, block, views, fresh)
        _run_threads(depth, offsets, read_one)
        t1, cpu1 = time.perf_counter(), cpu_seconds()
        samples = _check(read_one, size)
        t2 = time.perf_counter()
        if fresh is not None:
            fresh.release()
            fresh = None
        if region is not None:
            region.close()
            region = None
        if memfd >= 0:
            os.close(memfd)
            memfd = -1
        release = time.perf_counter() - t2
    finally:
        for view in views:
            view.release()
        if fresh is not None:
            fresh.release()
        if region is not None:
            region.close()
        if memfd >= 0:
            os.close(memfd)
        os.close(fd)
    return RawPass(wall_s=t1 - t0, cpu_s=cpu1 - cpu0, release_s=release, samples_checked=samples)


def _check(read_one: ReadOne, size: int) -> int:
    """Compare a few bytes with the pattern: first, middle and last block of the fresh copy, or
    the start of the chunk each reused buffer held last."""
    checks: list[tuple[memoryview, int]] = []
    if read_one.fresh is not None:
        for offset in sorted({0, size // 2 // BLOCK * BLOCK, size - BLOCK}):
            checks.append((read_one.fresh[offset : offset + _SAMPLE], offset))
    else:
        checks = [(read_one.views[slot][:_SAMPLE], offset) for slot, offset in read_one.last.items()]
    for view, offset in checks:
        if bytes(view) != pattern_bytes(offset, _SAMPLE):
            raise RawReadError(f"file offset {offset}: the buffer does not hold the file's bytes")
        view.release()
    return len(checks)
