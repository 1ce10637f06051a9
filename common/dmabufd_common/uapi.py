"""Kernel uAPI numbers and the few ioctls both sides issue.

Numbers are the same on x86-64 and arm64 (see the kernel's
include/uapi/linux/dma-buf.h, dma-heap.h and udmabuf.h).
"""

from __future__ import annotations

import errno
import fcntl
import struct
from enum import IntFlag

# include/uapi/linux/dma-heap.h
DMA_HEAP_IOCTL_ALLOC = 0xC0184800
DMA_HEAP_ALLOCATION_DATA = struct.Struct("<QIIQ")  # len, fd, fd_flags, heap_flags

# include/uapi/linux/dma-buf.h
DMA_BUF_IOCTL_SYNC = 0x40086200
DMA_BUF_SET_NAME_B = 0x40086201  # _IOW('b', 1, u64): the encoding current kernels document
DMA_BUF_NAME_LEN = 32  # including the NUL

# include/uapi/linux/udmabuf.h
UDMABUF_CREATE = 0x40187542
UDMABUF_CREATE_LIST = 0x40087543
UDMABUF_CREATE_STRUCT = struct.Struct("<IIQQ")  # memfd, flags, offset, size
UDMABUF_CREATE_LIST_HEADER = struct.Struct("<II")  # flags, count
UDMABUF_CREATE_ITEM = struct.Struct("<IIQQ")  # memfd, pad, offset, size
UDMABUF_FLAGS_CLOEXEC = 0x01

# include/uapi/linux/fcntl.h (F_SEAL_FUTURE_WRITE is missing from Python 3.11)
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010


class SyncFlags(IntFlag):
    """struct dma_buf_sync flags."""

    READ = 1
    WRITE = 2
    RW = 3
    START = 0
    END = 4


def dma_buf_sync(fd: int, flags: SyncFlags) -> None:
    """Bracket CPU access to a mapped dma-buf; retried on EINTR/EAGAIN as
    the kernel documents (the wait for fences may be interrupted)."""
    arg = struct.pack("<Q", int(flags))
    while True:
        try:
            fcntl.ioctl(fd, DMA_BUF_IOCTL_SYNC, arg)
            return
        except OSError as error:
            if error.errno not in (errno.EINTR, errno.EAGAIN):
                raise


def dma_buf_set_name(fd: int, name: str) -> None:
    """Name a dma-buf (shown in fdinfo and /proc/<pid>/maps)."""
    encoded = name.encode("ascii")
    if len(encoded) >= DMA_BUF_NAME_LEN:
        raise ValueError(f"dma-buf names hold at most {DMA_BUF_NAME_LEN - 1} bytes")
    # The ioctl argument is a pointer to a NUL-terminated string; fcntl passes
    # the address of its copy of this bytes object.
    fcntl.ioctl(fd, DMA_BUF_SET_NAME_B, encoded + b"\0")
