"""Kernel uAPI numbers and the few ioctls both sides issue.

Numbers are the same on x86-64 and arm64 (see the kernel's
include/uapi/linux/dma-buf.h, dma-heap.h, udmabuf.h and stat.h).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
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

# include/uapi/asm-generic/socket.h (Python 3.11's socket module names neither)
SO_PEERGROUPS = 59  # Linux 4.13
SO_PEERPIDFD = 77  # Linux 6.5

# include/uapi/linux/fcntl.h (F_SEAL_FUTURE_WRITE is missing from Python 3.11)
F_SEAL_SEAL = 0x0001
F_SEAL_SHRINK = 0x0002
F_SEAL_GROW = 0x0004
F_SEAL_WRITE = 0x0008
F_SEAL_FUTURE_WRITE = 0x0010
F_SEAL_EXEC = 0x0020


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


# include/uapi/linux/stat.h: statx(2) and the direct I/O alignment (6.1+)
STATX_DIOALIGN = 0x2000
AT_EMPTY_PATH = 0x1000
STATX_SIZE = 256
STATX_MASK = struct.Struct("<I")  # stx_mask, at offset 0
STATX_DIO_ALIGN = struct.Struct("<II")  # stx_dio_mem_align, stx_dio_offset_align
STATX_DIO_ALIGN_OFFSET = 152


@dataclass(frozen=True)
class DioAlignment:
    """Where a file system does direct I/O on a file: file offsets and
    lengths aligned to `offset`, memory to `memory`; 0 for both when it
    never does (it would quietly go through the page cache instead)."""

    memory: int
    offset: int

    @property
    def direct(self) -> bool:
        return self.offset > 0 and self.memory > 0


_libc = ctypes.CDLL(None, use_errno=True)


def dio_alignment(fd: int) -> DioAlignment | None:
    """The file system's direct I/O alignment for the file behind `fd`
    (statx STATX_DIOALIGN), or None where the kernel or file system does
    not say (before 6.1, or a file system that does not report it)."""
    buffer = ctypes.create_string_buffer(STATX_SIZE)
    if _libc.statx(fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buffer) != 0:
        error = ctypes.get_errno()
        if error in (errno.ENOSYS, errno.EINVAL):
            return None
        raise OSError(error, os.strerror(error))
    (mask,) = STATX_MASK.unpack_from(buffer.raw, 0)
    if not mask & STATX_DIOALIGN:
        return None
    memory, offset = STATX_DIO_ALIGN.unpack_from(buffer.raw, STATX_DIO_ALIGN_OFFSET)
    return DioAlignment(memory, offset)


# Room for this many groups is asked first; the kernel says how much more it needs.
_PEER_GROUPS_FIRST_TRY = 64


def peer_groups(sock_fd: int) -> frozenset[int]:
    """The supplementary groups a Unix socket's peer had when it connected
    (SO_PEERGROUPS). Through libc: socket.getsockopt() asks for at most
    1,024 bytes (256 groups), and a process may have 65,536."""
    count = _PEER_GROUPS_FIRST_TRY
    while True:
        groups = (ctypes.c_uint32 * count)()
        size = ctypes.c_uint32(ctypes.sizeof(groups))
        if _libc.getsockopt(sock_fd, socket.SOL_SOCKET, SO_PEERGROUPS, groups, ctypes.byref(size)) == 0:
            return frozenset(groups[: size.value // ctypes.sizeof(ctypes.c_uint32)])
        error = ctypes.get_errno()
        # The peer's credentials are fixed at connect(): one retry with the
        # room the kernel asked for suffices.
        if error != errno.ERANGE or count != _PEER_GROUPS_FIRST_TRY:
            raise OSError(error, f"SO_PEERGROUPS: {os.strerror(error)}")
        count = size.value // ctypes.sizeof(ctypes.c_uint32)
