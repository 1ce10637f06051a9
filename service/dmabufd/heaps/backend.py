"""The allocator interface and the buffer it hands out.

Ownership: an Allocation owns its fds (the buffer's, and for udmabuf the
memfd behind it) until close(). The ledger keeps the daemon's Allocation for
as long as a client holds the buffer in its books; the client receives
duplicates over SCM_RIGHTS, so the kernel keeps the memory alive while any
fd (daemon's or client's) or mapping remains.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import IntEnum

from dmabufd.loading.method import Method
from dmabufd_common import uapi

PAGE_SIZE = mmap.PAGESIZE


class BackendKind(IntEnum):
    # Values match dmabufd.v1.Backend.
    DMA_HEAP = 1
    UDMABUF = 2
    MEMFD = 3


@dataclass(frozen=True)
class HeapSpec:
    """What a heap is, as discovery sees it and clients are told."""

    name: str
    kind: BackendKind
    device_path: str
    # Largest single buffer; 0 when the kernel sets no limit.
    max_buffer_bytes: int = 0

    @property
    def device_importable(self) -> bool:
        return self.kind is not BackendKind.MEMFD

    @property
    def cpu_sync_required(self) -> bool:
        return self.kind is not BackendKind.MEMFD


class Allocation:
    """One buffer: its fd, and the memfd behind it for udmabuf."""

    __slots__ = ("backing_fd", "fd", "identity", "kind", "prepared", "size")

    def __init__(
        self, fd: int, size: int, kind: BackendKind, backing_fd: int | None = None, *, prepared: bool = False
    ) -> None:
        self.fd = fd
        self.size = size
        self.kind = kind
        self.backing_fd = backing_fd
        # Its pages were allocated before it was asked for (heaps/reserve.py).
        self.prepared = prepared
        info = os.fstat(fd)
        # (st_dev, st_ino): how the same buffer is recognised in another
        # process's /proc/<pid>/fd.
        self.identity = (info.st_dev, info.st_ino)

    def rename(self, kernel_name: str) -> None:
        """Give a reused buffer its new owner's name (dma-bufs only; one
        still attached to a device keeps its old name: EBUSY)."""
        if self.kind is not BackendKind.MEMFD:
            with contextlib.suppress(OSError):
                uapi.dma_buf_set_name(self.fd, kernel_name)

    def close(self) -> None:
        for fd in (self.fd, self.backing_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = -1
        self.backing_fd = None


def round_to_page(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class HeapBackend(ABC):
    """An allocator. allocate() is called from many threads at once; an
    implementation keeps no per-call state outside the call."""

    def __init__(self, spec: HeapSpec) -> None:
        self.spec = spec
        # Load methods that work into this heap's buffers on the running
        # kernel, fastest first; set by the registry's probe when the heap
        # appears.
        self.load_methods: tuple[Method, ...] = ()

    @abstractmethod
    def allocate(self, size: int, kernel_name: str, *, prepared: bool = False) -> Allocation:
        """Allocate a buffer of exactly `size` bytes (already page-rounded)
        named `kernel_name` (at most 31 ASCII bytes). Raises OSError.
        `prepared`: a prepared memfd may serve it (heaps/reserve.py); only
        loads ask, on their own threads, since taking one frees the pages
        past `size` and a load writes every byte it keeps anyway."""

    def close(self) -> None:  # noqa: B027 - optional hook: memfd caches nothing
        """Release cached device fds; buffers already allocated live on."""


class DeviceBackend(HeapBackend):
    """A backend that allocates through a device node (a DMA heap,
    /dev/udmabuf). The node is opened once, at first use, and the fd cached
    for the life of the heap (one open per heap, not per allocation, as
    libdmabufheap does); the allocation ioctls need no lock of ours."""

    def __init__(self, spec: HeapSpec, open_flags: int) -> None:
        super().__init__(spec)
        self._open_flags = open_flags
        self._device_fd: int | None = None
        self._open_lock = threading.Lock()  # guards _device_fd

    def device(self) -> int:
        with self._open_lock:
            if self._device_fd is None:
                self._device_fd = os.open(self.spec.device_path, self._open_flags | os.O_CLOEXEC)
            return self._device_fd

    def close(self) -> None:
        with self._open_lock:
            if self._device_fd is not None:
                os.close(self._device_fd)
                self._device_fd = None
