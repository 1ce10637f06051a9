"""Kernel DMA heaps: /dev/dma_heap/<name>.

The heap device is opened once, at first use, and the fd is cached for the
life of the heap: one open per heap rather than per allocation (as
libdmabufheap does). Its fd is only ever used for DMA_HEAP_IOCTL_ALLOC,
which the kernel serialises per heap as it needs; no lock is held here.
"""

from __future__ import annotations

import fcntl
import os
import threading

from dmabufd.heaps.backend import Allocation, BackendKind, HeapBackend, HeapSpec
from dmabufd_common import uapi


class DmaHeapBackend(HeapBackend):
    def __init__(self, spec: HeapSpec) -> None:
        super().__init__(spec)
        self._heap_fd: int | None = None
        self._open_lock = threading.Lock()  # guards _heap_fd

    def _device(self) -> int:
        with self._open_lock:
            if self._heap_fd is None:
                self._heap_fd = os.open(self.spec.device_path, os.O_RDONLY | os.O_CLOEXEC)
            return self._heap_fd

    def allocate(self, size: int, kernel_name: str) -> Allocation:
        request = bytearray(uapi.DMA_HEAP_ALLOCATION_DATA.pack(size, 0, os.O_RDWR | os.O_CLOEXEC, 0))
        fcntl.ioctl(self._device(), uapi.DMA_HEAP_IOCTL_ALLOC, request, True)
        _, fd, _, _ = uapi.DMA_HEAP_ALLOCATION_DATA.unpack(request)
        try:
            uapi.dma_buf_set_name(fd, kernel_name)
            return Allocation(fd, size, BackendKind.DMA_HEAP)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        with self._open_lock:
            if self._heap_fd is not None:
                os.close(self._heap_fd)
                self._heap_fd = None
