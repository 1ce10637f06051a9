"""The eight raw load modes of the seed benchmark, on raw syscalls.

Each mode makes one buffer per chunk (creation: allocate + mmap), then moves the chunk's bytes
from the file into it. The data never passes through Python objects on the hot path: preadv
writes straight into the mapping, sendfile/splice/copy_file_range move it inside the kernel.
Buffers come from the daemon's own backends (dmabufd.heaps), so creation costs what the daemon
pays: memfd (sealed), udmabuf (sealed memfd + UDMABUF_CREATE + name), system heap (ALLOC + name).
"""

from __future__ import annotations

import errno
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from bench.system import errno_name, size_pipe
from dmabufd.heaps.backend import Allocation, BackendKind, HeapBackend, HeapSpec
from dmabufd.heaps.dmaheap import DmaHeapBackend
from dmabufd.heaps.memfd import MEMFD_SPEC, MemfdBackend
from dmabufd.heaps.udmabuf import UDMABUF_HEAP_NAME, UdmabufBackend, read_size_limit
from dmabufd_common import uapi
from dmabufd_common.units import format_size

SYSTEM_HEAP = Path("/dev/dma_heap/system")
UDMABUF_DEVICE = Path("/dev/udmabuf")
SYS_ROOT = Path("/sys")
SIZE_LIMIT_PARAMETER = SYS_ROOT / "module/udmabuf/parameters/size_limit_mb"
KERNEL_NAME = "bench"
# copy_file_range into a dma-buf on a kernel without the series: the errno is the reason.
CFR_UNSUPPORTED = (errno.EINVAL, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF)


class ModeUnsupported(Exception):
    """The kernel cannot do this mode: skip it, with this reason."""


@dataclass
class Slot:
    """One chunk's buffer: the allocation, the fd the I/O targets, and a mapping of the
    buffer for CPU access (bracketed by DMA_BUF_IOCTL_SYNC when `sync_fd` is a dma-buf)."""

    allocation: Allocation
    io_fd: int
    region: mmap.mmap
    view: memoryview
    sync_fd: int | None

    def close(self) -> None:
        self.view.release()
        self.region.close()
        self.allocation.close()


def map_slot(allocation: Allocation, map_fd: int, sync: bool, io_fd: int | None = None) -> Slot:
    try:
        region = mmap.mmap(map_fd, allocation.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        allocation.close()
        raise
    return Slot(allocation, map_fd if io_fd is None else io_fd, region, memoryview(region), map_fd if sync else None)


@dataclass
class Kernel:
    """What this machine offers, probed once: the backends the modes need, or why not."""

    chunk: int
    heap: HeapBackend | None = None
    heap_missing: str | None = None
    udmabuf: HeapBackend | None = None
    udmabuf_missing: str | None = None
    udmabuf_size_limit: int | None = None
    memfd: HeapBackend = field(default_factory=lambda: MemfdBackend(MEMFD_SPEC))

    @classmethod
    def probe(cls, chunk: int) -> Kernel:
        kernel = cls(chunk)
        if os.access(SYSTEM_HEAP, os.R_OK):
            kernel.heap = DmaHeapBackend(HeapSpec("system", BackendKind.DMA_HEAP, str(SYSTEM_HEAP)))
        else:
            kernel.heap_missing = f"no {SYSTEM_HEAP}" if not SYSTEM_HEAP.exists() else f"{SYSTEM_HEAP} not readable"
        if not UDMABUF_DEVICE.exists():
            kernel.udmabuf_missing = f"no {UDMABUF_DEVICE}"
            return kernel
        if not os.access(UDMABUF_DEVICE, os.R_OK | os.W_OK):
            kernel.udmabuf_missing = f"{UDMABUF_DEVICE} not writable"
            return kernel
        kernel.udmabuf_size_limit = read_size_limit(SYS_ROOT)
        if chunk > kernel.udmabuf_size_limit:
            kernel.udmabuf_missing = (
                f"chunk {format_size(chunk)} > udmabuf size_limit_mb {kernel.udmabuf_size_limit >> 20} "
                f"({SIZE_LIMIT_PARAMETER})"
            )
            return kernel
        spec = HeapSpec(UDMABUF_HEAP_NAME, BackendKind.UDMABUF, str(UDMABUF_DEVICE), kernel.udmabuf_size_limit)
        kernel.udmabuf = UdmabufBackend(spec)
        return kernel

    def close(self) -> None:
        for backend in (self.heap, self.udmabuf):
            if backend is not None:
                backend.close()


@dataclass
class Source:
    """The file, opened twice: O_DIRECT and buffered."""

    direct_fd: int
    buffered_fd: int


def read_all(fd: int, view: memoryview, offset: int, length: int) -> None:
    """preadv until `length` bytes landed in view[:length] (short reads are legal)."""
    done = 0
    while done < length:
        moved = os.preadv(fd, [view[done:length]], offset + done)
        if moved <= 0:
            raise OSError(errno.EIO, f"file ended {offset + done} bytes in, {length - done} bytes early")
        done += moved


def sync(slot: Slot, flags: uapi.SyncFlags) -> None:
    if slot.sync_fd is not None:
        uapi.dma_buf_sync(slot.sync_fd, flags)


class Mode(ABC):
    number: int
    key: str
    label: str

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.notes: list[str] = []

    def skip_reason(self) -> str | None:
        """Why the kernel cannot do this mode, or None."""
        return None

    def begin(self) -> None:  # noqa: B027 - optional: per-run setup outside the timed sections
        """Set up what every chunk of one run shares (outside the timed sections)."""

    def end(self) -> None:  # noqa: B027 - optional
        """Undo begin()."""

    @abstractmethod
    def create(self, size: int) -> Slot:
        """Allocate and map one buffer of `size` bytes (timed: Creat-ms)."""

    @abstractmethod
    def load(self, source: Source, slot: Slot, offset: int, length: int) -> None:
        """Move file bytes [offset, offset + length) into the buffer (timed: I/O-ms)."""


class MemfdDirectRead(Mode):
    number, key, label = 1, "memfd-direct-rw", "memfd direct R/W"

    def create(self, size: int) -> Slot:
        allocation = self.kernel.memfd.allocate(size, KERNEL_NAME)
        return map_slot(allocation, allocation.fd, sync=False)

    def load(self, source: Source, slot: Slot, offset: int, length: int) -> None:
        read_all(source.direct_fd, slot.view, offset, length)


def _udmabuf_over_memfd(kernel: Kernel, size: int) -> Slot:
    """A udmabuf over a sealed memfd (or the memfd alone without udmabuf); I/O and CPU access
    go through the memfd's mapping (the udmabuf's own mapping is PFN-mapped: no O_DIRECT)."""
    if kernel.udmabuf is None:
        allocation = kernel.memfd.allocate(size, KERNEL_NAME)
        return map_slot(allocation, allocation.fd, sync=False)
    allocation = kernel.udmabuf.allocate(size, KERNEL_NAME)
    assert allocation.backing_fd is not None
    return map_slot(allocation, allocation.backing_fd, sync=False)


class UMemfdDirectRead(Mode):
    number, key, label = 2, "u+memfd-direct-rw", "u+memfd direct R/W"

    def skip_reason(self) -> str | None:
        if self.kernel.udmabuf is None:
            return f"{self.kernel.udmabuf_missing} (without a udmabuf this is mode 1)"
        return None

    def create(self, size: int) -> Slot:
        return _udmabuf_over_memfd(self.kernel, size)

    def load(self, source: Source, slot: Slot, offset: int, length: int) -> None:
        read_all(source.direct_fd, slot.view, offset, length)


class _MemfdStreamMode(Mode):
    """Modes 3 and 4: the memfd part runs without udmabuf too (the stock fallback's speed)."""

    base_label = ""

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        if kernel.udmabuf is None:
            self.label = f"memfd {self.base_label} (no udmabuf)"
            self.notes.append(f"no udmabuf ({kernel.udmabuf_missing}): the memfd part alone")
        else:
            self.label = f"u+memfd {self.base_label}"

    def create(self, size: int) -> Slot:
        return _udmabuf_over_memfd(self.kernel, size)


class UMemfdDirectSendfile(_MemfdStreamMode):
    number, key, base_label = 3, "u+memfd-direct-sendfile", "direct sendfile"

    def load(self, source: Source, slot: Slot, offset: int, length: int) -> None:
        # sendfile writes at the memfd's file position, which starts at 0 for a new memfd.
        done = 0
        while done < length:
            moved = os.sendfile(slot.io_fd, source.direct_fd, offset + done, length - done)
            if moved <= 0:
                raise OSError(errno.EIO, f"sendfile moved nothing at {offset + done}")
            done += moved


class UMemfdDirectSplice(_MemfdStreamMode):
    number, key, base_label = 4, "u+memfd-direct-splice", "direct splice"

    def __init__(self, kernel: Kernel) -> None:
        super().__init__(kernel)
        self.pipe: tuple[int, int] | None = None
        self.pipe_size = 0

    def begin(self) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.pipe = (read_end, write_end)
        self.pipe_size, why = size_pipe(read_end, self.kernel.chunk)
        if why is not None and why not in self.notes:
            self.notes.append(why)

    def end(self) -> None:
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def load(self, source: Source, slot: Slot, offset: int, length: int) -> None:
        assert self.pipe is not None
        read_end, write_end = self.pipe
        done = 0
        while done < length:
            filled = os.splice(
                source.direct_fd, write_end, min(self.pipe_size, length - done), offset_src=offset + done
            )
            if filled <= 0:
                raise OSError(errno.EIO, f"splice from the file moved nothing at {offset + done}")
            while filled:
                drained = os.splice(read_end, slot.io_fd, filled, offset_dst=done)
                filled -= drained
                done += drained


class _UdmabufTarget(Mode):
    """The I/O targets a udmabuf itself (its PFN-mapped mmap, or its fd)."""

    def skip_reason(self) -> str | None:
        return self.kernel.udmabuf_missing if self.kernel.udmabuf is None else None

    def create(self, size: int) -> Slot:
        assert self.kernel.udmabuf is not None
        allocation = self.kernel.udmabuf.allocate(size, KERNEL_NAME)
        return map_slot(allocation, allocation.fd, sync=True)


class _HeapTarget(Mode):
    """The I/O targets a system-heap dma-buf."""

    def skip_reason(self) -> str | None:
        return self.kernel.heap_missing if self.kernel.heap is None else None

    def create(self, size: int) -> Slot:
        assert self.kernel.heap is not None
        allocation = self.kernel.heap.allocate(size, KERNEL_NAME)
        return map_slot(allocation, allocation.fd, sync=True)


class _BufferedIntoMapping(Mode):
    """Modes 5 and 6: buffered read() into the dma-buf's own mapping, bracketed by SYNC."""

    def load(self, source: Source, slot: Slot, offset: int, length: int) -> None:
        sync(slot, uapi.SyncFlags.START | uapi.SyncFlags.WRITE)
        try:
            read_all(source.buffered_fd, slot.view, offset, length)
        finally:
            sync(slot, uapi.SyncFlags.END | uapi.SyncFlags.WRITE)


class _DirectCopyFileRange(Mode):
    """Modes 7 and 8: copy_file_range(O_DIRECT file -> dma-buf): the patched kernel's path.
    A stock kernel refuses the first call; its errno is the skip reason."""

    target = "dma-buf"

    def load(self, source: Source, slot: Slot, offset: int, length: int) -> None:
        done = 0
        while done < length:
            try:
                moved = os.copy_file_range(source.direct_fd, slot.io_fd, length - done, offset + done, done)
            except OSError as error:
                if offset == 0 and done == 0 and error.errno in CFR_UNSUPPORTED:
                    raise ModeUnsupported(
                        f"copy_file_range(O_DIRECT file -> {self.target}) refused: {errno_name(error)}"
                    ) from error
                raise
            if moved <= 0:
                raise OSError(errno.EIO, f"copy_file_range moved nothing at {offset + done}")
            done += moved


class UdmabufBufferedRead(_UdmabufTarget, _BufferedIntoMapping):
    number, key, label = 5, "udmabuf-buffer-rw", "udmabuf buffer R/W"


class HeapBufferedRead(_HeapTarget, _BufferedIntoMapping):
    number, key, label = 6, "dmabuf-buffer-rw", "dmabuf buffer R/W"


class UdmabufDirectCfr(_UdmabufTarget, _DirectCopyFileRange):
    number, key, label = 7, "udmabuf-direct-cfr", "udmabuf direct c_f_r"
    target = "udmabuf"


class HeapDirectCfr(_HeapTarget, _DirectCopyFileRange):
    number, key, label = 8, "dmabuf-direct-cfr", "dmabuf direct c_f_r"
    target = "system-heap dma-buf"


MODES: tuple[type[Mode], ...] = (
    MemfdDirectRead,
    UMemfdDirectRead,
    UMemfdDirectSendfile,
    UMemfdDirectSplice,
    UdmabufBufferedRead,
    HeapBufferedRead,
    UdmabufDirectCfr,
    HeapDirectCfr,
)
