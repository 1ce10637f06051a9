"""udmabuf: shmem pages of a sealed memfd, exported as a dma-buf.

The kernel requires the memfd to be sealed against shrinking (the dma-buf
pins its pages) and not sealed against writes. The daemon keeps the memfd
as the Allocation's backing fd: I/O into the buffer's pages can go through
the memfd (O_DIRECT reads into its mapping), which the udmabuf's own
PFN-mapped mmap does not allow.

One udmabuf may not exceed the module's size_limit_mb (64 MiB by default);
the limit is read from sysfs once, when the heap is discovered.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dmabufd.heaps.backend import Allocation, BackendKind, DeviceBackend, HeapSpec
from dmabufd.heaps.memfd import sealed_memfd
from dmabufd_common import uapi

UDMABUF_HEAP_NAME = "udmabuf"
DEFAULT_SIZE_LIMIT_MB = 64


def read_size_limit(sys_root: Path) -> int:
    """udmabuf's per-buffer limit in bytes, from the module parameter."""
    parameter = sys_root / "module/udmabuf/parameters/size_limit_mb"
    try:
        return int(parameter.read_text().strip()) << 20
    except (OSError, ValueError):
        return DEFAULT_SIZE_LIMIT_MB << 20


class UdmabufBackend(DeviceBackend):
    def __init__(self, spec: HeapSpec) -> None:
        super().__init__(spec, os.O_RDWR)

    def allocate(self, size: int, kernel_name: str, *, prepared: bool = False) -> Allocation:
        memfd = sealed_memfd(kernel_name, size, uapi.F_SEAL_SHRINK)
        try:
            create = bytearray(uapi.UDMABUF_CREATE_STRUCT.pack(memfd, uapi.UDMABUF_FLAGS_CLOEXEC, 0, size))
            # A mutable buffer makes fcntl return the ioctl's result: the new fd.
            fd = fcntl.ioctl(self.device(), uapi.UDMABUF_CREATE, create, True)
        except BaseException:
            os.close(memfd)
            raise
        try:
            uapi.dma_buf_set_name(fd, kernel_name)
            return Allocation(fd, size, BackendKind.UDMABUF, backing_fd=memfd)
        except BaseException:
            os.close(fd)
            os.close(memfd)
            raise
