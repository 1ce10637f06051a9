"""Kernel DMA heaps: /dev/dma_heap/<name>, allocated with DMA_HEAP_IOCTL_ALLOC.

Buffers are allocated O_RDWR (a loader must write them) and close-on-exec;
the kernel zero-fills them and names their exporter after the heap.
"""

from __future__ import annotations

import fcntl
import os

from dmabufd.heaps.backend import Allocation, BackendKind, DeviceBackend, HeapSpec
from dmabufd_common import uapi


class DmaHeapBackend(DeviceBackend):
    def __init__(self, spec: HeapSpec) -> None:
        super().__init__(spec, os.O_RDONLY)

    def allocate(self, size: int, kernel_name: str, *, prepared: bool = False) -> Allocation:
        request = bytearray(uapi.DMA_HEAP_ALLOCATION_DATA.pack(size, 0, os.O_RDWR | os.O_CLOEXEC, 0))
        fcntl.ioctl(self.device(), uapi.DMA_HEAP_IOCTL_ALLOC, request, True)
        _, fd, _, _ = uapi.DMA_HEAP_ALLOCATION_DATA.unpack(request)
        try:
            uapi.dma_buf_set_name(fd, kernel_name)
            return Allocation(fd, size, BackendKind.DMA_HEAP)
        except BaseException:
            os.close(fd)
            raise
