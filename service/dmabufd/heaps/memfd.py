"""Sealed memfds: the backend that works on every Linux kernel.

A memfd is not a dma-buf (devices cannot import it), but clients map and
share it the same way. Seals make its size immutable: F_SEAL_SHRINK so a
client cannot truncate pages out from under another client's mapping
(SIGBUS), F_SEAL_GROW so it cannot grow past what was accounted.
F_SEAL_SEAL is left off so read-only sharing can still add
F_SEAL_FUTURE_WRITE later.
"""

from __future__ import annotations

import fcntl
import os

from dmabufd.heaps.backend import Allocation, BackendKind, HeapBackend, HeapSpec
from dmabufd.heaps.reserve import MemfdReserve
from dmabufd_common import uapi

MEMFD_HEAP_NAME = "memfd"
# What every memfd buffer is made with (a recycled one must still carry
# exactly these: heaps/buffer.py, reusable()).
MEMFD_SEALS = uapi.F_SEAL_SHRINK | uapi.F_SEAL_GROW


def sealed_memfd(kernel_name: str, size: int, seals: int) -> int:
    """A memfd of `size` bytes named `kernel_name`, with `seals` added."""
    fd = os.memfd_create(kernel_name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd
    except BaseException:
        os.close(fd)
        raise


MEMFD_SPEC = HeapSpec(MEMFD_HEAP_NAME, BackendKind.MEMFD, "")


class MemfdBackend(HeapBackend):
    """Fresh sealed memfds, or for a load prepared ones from the daemon's
    reserve (heaps/reserve.py) when one fits the size."""

    def __init__(self, spec: HeapSpec, reserve: MemfdReserve | None = None) -> None:
        super().__init__(spec)
        self._reserve = reserve

    def allocate(self, size: int, kernel_name: str, *, prepared: bool = False) -> Allocation:
        if prepared and self._reserve is not None:
            fd = self._reserve.take(size, MEMFD_SEALS)
            if fd is not None:
                return Allocation(fd, size, BackendKind.MEMFD, prepared=True)
        fd = sealed_memfd(kernel_name, size, MEMFD_SEALS)
        return Allocation(fd, size, BackendKind.MEMFD)
