"""The ways bytes move from a file into a buffer: one function per method.

Every function copies one Piece: `length` bytes of the file from
`file_offset` into the buffer at `buffer_offset`, where the two offsets are
congruent modulo DIO_ALIGN (the loader lays buffers out that way). The
aligned middle of a piece goes through the direct path; an unaligned head
or tail (the ends of the file range) goes through the buffered fd the same
way, since direct I/O needs file offset, memory address and length aligned
to the file system's (4 KiB covers every one we meet; source.py keeps the
O_DIRECT fd only where statx says so). A piece the page cache holds whole
(`cached`) goes through the buffered fd too: copying from memory beats
reading the device again. Each function returns where its parts came from.

Direct-read and buffered-read fill a memfd buffer by writing to it
(_write_into_memfd), never through a mapping: a write allocates a fresh
shmem page and fills it at once, a fault zeroes it first (sendfile and
splice write into it too, by their own system calls). Mappings are for
dma-bufs (udmabuf, heap buffers), whose pages exist before the load.

Data never passes through Python objects: preadv() writes into a mapping
of the destination or into a lane's bounce buffer (an mmap that pwrite()
empties into a memfd), and sendfile(), splice() and copy_file_range() move
it inside the kernel. Mappings are windows of one piece, unmapped at once, so
the daemon's resident memory does not grow with the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from dmabufd.errors import FileChanged
from dmabufd.heaps.backend import PAGE_SIZE, Allocation, BackendKind
from dmabufd.loading.method import Method, PartSource
from dmabufd_common import uapi

DIO_ALIGN = 4096
# Reads bound for a memfd (direct-read, buffered-read) land in a buffer of
# this size per I/O lane (a multiple of DIO_ALIGN, for O_DIRECT) before
# they are written; with 8 lanes, 16 MiB in flight.
BOUNCE_BYTES = 2 << 20
# Per I/O lane thread: its bounce buffer.
_lane = threading.local()
F_SETPIPE_SZ = 1031


@dataclass(frozen=True)
class Piece:
    file_offset: int
    buffer_offset: int
    length: int

    def split(self) -> tuple[Piece | None, Piece | None, Piece | None]:
        """(head, aligned body, tail): the body starts and ends on DIO_ALIGN."""
        start, end = self.file_offset, self.file_offset + self.length
        body_start = -(-start // DIO_ALIGN) * DIO_ALIGN
        body_end = end // DIO_ALIGN * DIO_ALIGN
        if body_start >= body_end:
            return self, None, None
        shift = self.buffer_offset - self.file_offset

        def part(a: int, b: int) -> Piece | None:
            return Piece(a, a + shift, b - a) if b > a else None

        return part(start, body_start), part(body_start, body_end), part(body_end, end)


@dataclass(frozen=True)
class Source:
    buffered_fd: int
    direct_fd: int | None
    # One lane at a time writes into each of a load's memfds: shmem takes
    # the file's inode lock for each write, and lanes that queue on it
    # spin. A writer lock is held across the pwrite or sendfile it
    # serializes, by this load's lanes only; lanes writing into different
    # memfds do not wait for each other. Those are memory copies (bounce
    # buffers, and parts the page cache holds), with one exception: a part
    # cachestat counted as cached whose pages left the cache before its
    # sendfile is read from the device under the lock (_write_buffered).
    _writers: dict[int, threading.Lock] = field(default_factory=dict, compare=False)
    # Guards _writers (a lookup, or adding a lock).
    _writers_lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    def shmem_writer(self, memfd: int) -> threading.Lock:
        """The lock a lane holds while it writes into `memfd`."""
        with self._writers_lock:
            return self._writers.setdefault(memfd, threading.Lock())


def _shrank(piece: Piece, done: int) -> FileChanged:
    return FileChanged(
        f"the file ended {piece.length - done} bytes early at offset {piece.file_offset + done}: "
        "it was truncated while loading"
    )


@contextlib.contextmanager
def _window(fd: int, piece: Piece, sync: bool) -> Iterator[memoryview]:
    """A writable view of the buffer bytes `piece` covers, mapped for the
    duration of the block (and bracketed by DMA_BUF_IOCTL_SYNC if `sync`)."""
    start = piece.buffer_offset // PAGE_SIZE * PAGE_SIZE
    end = piece.buffer_offset + piece.length
    region = mmap.mmap(fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    view = memoryview(region)[piece.buffer_offset - start : end - start]
    if sync:
        uapi.dma_buf_sync(fd, uapi.SyncFlags.START | uapi.SyncFlags.WRITE)
    try:
        yield view
    finally:
        if sync:
            uapi.dma_buf_sync(fd, uapi.SyncFlags.END | uapi.SyncFlags.WRITE)
        view.release()
        region.close()


def _pread_into(fd: int, piece: Piece, view: memoryview) -> None:
    done = 0
    while done < piece.length:
        count = os.preadv(fd, [view[done:]], piece.file_offset + done)
        if count == 0:
            raise _shrank(piece, done)
        done += count


def _memfd_of(target: Allocation) -> int:
    """The shmem file behind a buffer, for methods that write into it."""
    if target.kind is BackendKind.MEMFD:
        return target.fd
    if target.backing_fd is None:
        raise ValueError(f"{target.kind.name} buffers have no memfd behind them")
    return target.backing_fd


# What a transfer function reports: each part it copied and where from.
Parts = list[tuple[Piece, PartSource]]


def _each_part(piece: Piece, source: Source, cached: bool) -> Iterator[tuple[int, Piece, PartSource]]:
    """(fd, part, where from) for the piece's head, body and tail: the body
    on the O_DIRECT fd when there is one, the whole piece on the buffered fd
    when the page cache holds it."""
    if cached:
        yield source.buffered_fd, piece, PartSource.PAGE_CACHE
        return
    head, body, tail = piece.split()
    for part, direct in ((head, False), (body, True), (tail, False)):
        if part is None:
            continue
        if direct and source.direct_fd is not None:
            yield source.direct_fd, part, PartSource.DEVICE
        else:
            yield source.buffered_fd, part, PartSource.BUFFERED


def direct_copy_file_range(source: Source, target: Allocation, piece: Piece, cached: bool) -> Parts:
    parts: Parts = []
    for fd, part, where in _each_part(piece, source, cached):
        done = 0
        while done < part.length:
            count = os.copy_file_range(
                fd, target.fd, part.length - done, part.file_offset + done, part.buffer_offset + done
            )
            if count == 0:
                raise _shrank(part, done)
            done += count
        parts.append((part, where))
    return parts


def direct_read(source: Source, target: Allocation, piece: Piece, cached: bool) -> Parts:
    memfd = _memfd_of(target)
    parts: Parts = []
    for fd, part, where in _each_part(piece, source, cached):
        if target.kind is BackendKind.MEMFD or where is PartSource.PAGE_CACHE:
            _write_into_memfd(source, fd, where, memfd, part)
        else:  # udmabuf: its pages exist (pinned), read straight into them
            with _window(memfd, part, sync=False) as view:
                _pread_into(fd, part, view)
        parts.append((part, where))
    return parts


def _write_into_memfd(source: Source, fd: int, where: PartSource, memfd: int, part: Piece) -> None:
    """Fill a part of a memfd by writing to it, never through a mapping: a
    write allocates each shmem page and fills it in one pass, where a
    fault through a mapping allocates and zeroes it first. A fresh memfd's
    pages cost most of a load's CPU, and lanes faulting them in on every
    core at once kept the daemon's other clients waiting for a CPU
    (bench/README.md, "Beside a load")."""
    if where is PartSource.PAGE_CACHE:
        _write_buffered(source, memfd, part)
    else:
        _read_through_bounce(source, fd, memfd, part)


def _bounce() -> memoryview:
    """This lane's bounce buffer: made on its first use, freed with the
    lane's thread when the load ends (the lanes' threads live as long as
    their load)."""
    view: memoryview | None = getattr(_lane, "bounce", None)
    if view is None:
        view = _lane.bounce = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
    return view


def _read_through_bounce(source: Source, fd: int, memfd: int, part: Piece) -> None:
    """Reads of a part into the lane's bounce buffer (O_DIRECT ones for an
    aligned body), each then written into the memfd. Reading into a
    mapping of a fresh memfd instead makes every page cost a zeroing and a
    fault; written, the page is allocated and filled at once. Here that cut
    the CPU of a cold 512 MiB load by about a fifth (0.73-0.81 to 0.57-0.65
    CPU-s/GiB over 4 paired runs) with the same or better wall time, for
    one more copy, out of the bounce buffer."""
    view = _bounce()
    done = 0
    while done < part.length:
        want = min(BOUNCE_BYTES, part.length - done)
        got = os.preadv(fd, [view[:want]], part.file_offset + done)
        if got == 0:
            raise _shrank(part, done)
        with source.shmem_writer(memfd):
            written = 0
            while written < got:
                written += os.pwrite(memfd, view[written:got], part.buffer_offset + done + written)
        done += got


def _write_buffered(source: Source, memfd: int, part: Piece) -> None:
    """Copy a part from the page cache into a memfd by writing to the
    memfd (sendfile), not by reading into a mapping of it. The write
    allocates each shmem page and fills it in one pass: no zeroing first,
    no page-table entry, no fault per page, which is most of what a fresh
    page costs. Here that halves the CPU of copying a cached file (about
    0.45 against 0.9 CPU-s/GiB, `make bench-load`). One lane at a time
    writes into a memfd (Source.shmem_writer); the others carry on with
    their device reads, or their writes into other memfds, meanwhile. If
    the pages left the cache since cachestat counted them, this write reads
    them from the device under that lock: rare, and only slower."""
    with source.shmem_writer(memfd):
        out = _reopen_for_writing(memfd)
        try:
            os.lseek(out, part.buffer_offset, os.SEEK_SET)
            done = 0
            while done < part.length:
                count = os.sendfile(out, source.buffered_fd, part.file_offset + done, part.length - done)
                if count == 0:
                    raise _shrank(part, done)
                done += count
        finally:
            os.close(out)


def buffered_read(source: Source, target: Allocation, piece: Piece, cached: bool) -> Parts:
    where = PartSource.PAGE_CACHE if cached else PartSource.BUFFERED
    if target.kind is BackendKind.MEMFD:
        _write_into_memfd(source, source.buffered_fd, where, target.fd, piece)
    else:
        with _window(target.fd, piece, sync=True) as view:  # a dma-buf: udmabuf or a heap's
            _pread_into(source.buffered_fd, piece, view)
    return [(piece, where)]


def _reopen_for_writing(fd: int) -> int:
    """A new open file description of the same memfd, with its own file
    position (sendfile writes at the position; workers must not share one)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)


def sendfile(source: Source, target: Allocation, piece: Piece, cached: bool) -> Parts:
    out = _reopen_for_writing(_memfd_of(target))
    parts: Parts = []
    try:
        for fd, part, where in _each_part(piece, source, cached):
            os.lseek(out, part.buffer_offset, os.SEEK_SET)
            done = 0
            while done < part.length:
                count = os.sendfile(out, fd, part.file_offset + done, part.length - done)
                if count == 0:
                    raise _shrank(part, done)
                done += count
            parts.append((part, where))
    finally:
        os.close(out)
    return parts


def splice(source: Source, target: Allocation, piece: Piece, cached: bool) -> Parts:
    memfd = _memfd_of(target)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    parts: Parts = []
    try:
        with contextlib.suppress(OSError):  # EPERM past pipe-max-size: keep the default
            fcntl.fcntl(write_end, F_SETPIPE_SZ, min(piece.length, 1 << 20))
        for fd, part, where in _each_part(piece, source, cached):
            done = 0
            while done < part.length:
                moved = os.splice(fd, write_end, part.length - done, offset_src=part.file_offset + done)
                if moved == 0:
                    raise _shrank(part, done)
                drained = 0
                while drained < moved:
                    drained += os.splice(
                        read_end, memfd, moved - drained, offset_dst=part.buffer_offset + done + drained
                    )
                done += moved
            parts.append((part, where))
    finally:
        os.close(read_end)
        os.close(write_end)
    return parts


TRANSFERS = {
    Method.DIRECT_CFR: direct_copy_file_range,
    Method.DIRECT_READ: direct_read,
    Method.SENDFILE: sendfile,
    Method.SPLICE: splice,
    Method.BUFFERED_READ: buffered_read,
}


def writes_into_memfds(method: Method, kind: BackendKind) -> bool:
    """Whether the lanes of a load by `method` into buffers of `kind` write
    into memfds one lane at a time (Source.shmem_writer), so that spreading
    them over several memfds lets them write at once (transfer.py's order,
    models.py's split): direct-read (into a memfd, or the cached parts into
    a udmabuf's), and buffered-read into a memfd. Heap buffers and the rest
    of udmabuf's are filled through mappings, in file order."""
    if method is Method.DIRECT_READ:
        return kind in (BackendKind.MEMFD, BackendKind.UDMABUF)
    return method is Method.BUFFERED_READ and kind is BackendKind.MEMFD


# Which methods can write into which kind of buffer at all (the probe then
# says which the running kernel really supports).
APPLICABLE: dict[BackendKind, tuple[Method, ...]] = {
    BackendKind.DMA_HEAP: (Method.DIRECT_CFR, Method.BUFFERED_READ),
    BackendKind.UDMABUF: (Method.DIRECT_CFR, Method.DIRECT_READ, Method.SPLICE, Method.SENDFILE, Method.BUFFERED_READ),
    BackendKind.MEMFD: (Method.DIRECT_READ, Method.SPLICE, Method.SENDFILE, Method.BUFFERED_READ),
}
