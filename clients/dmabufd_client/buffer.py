"""A buffer the daemon handed to this process.

A Buffer owns its fd: close() (or leaving a `with` block) closes it and
tells the daemon to drop it from this client's books. Mappings are opened
with map(), a context manager that brackets CPU access with
DMA_BUF_IOCTL_SYNC for dma-bufs (a memfd needs no sync), and gives a
zero-copy memoryview, or numpy arrays over the same memory.
"""

from __future__ import annotations

import enum
import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dmabufd_common import uapi


class Backend(enum.IntEnum):
    # Values match dmabufd.v1.Backend.
    UNSPECIFIED = 0
    DMA_HEAP = 1
    UDMABUF = 2
    MEMFD = 3


class Access(enum.Flag):
    READ = 1
    WRITE = 2
    RW = 3


@dataclass(frozen=True)
class BufferInfo:
    id: int
    size: int
    heap: str
    backend: Backend
    kernel_name: str
    usage: str
    created_at: float
    inode: int


class Mapping:
    """A mapped buffer, valid inside Buffer.map()'s block only."""

    def __init__(self, region: mmap.mmap, writable: bool) -> None:
        self._region = region
        self._views: list[memoryview] = []
        self.writable = writable

    @property
    def memoryview(self) -> memoryview:
        view = memoryview(self._region)
        if not self.writable:
            view = view.toreadonly()
        self._views.append(view)
        return view

    def numpy(self, dtype: npt.DTypeLike = np.uint8, shape: tuple[int, ...] | None = None, offset: int = 0) -> Any:
        """An array over the mapping (no copy). Drop it before the block ends."""
        array = np.frombuffer(self.memoryview, dtype=dtype, offset=offset)
        if shape is not None:
            array = array[: int(np.prod(shape))].reshape(shape)
        return array

    def _release(self) -> bool:
        """Release every view handed out; False if one is still in use."""
        try:
            for view in self._views:
                view.release()
        except BufferError:
            return False
        self._views.clear()
        return True


class Buffer:
    def __init__(self, fd: int, info: BufferInfo, release: Callable[[Buffer], None] | None) -> None:
        self._fd = fd
        self.info = info
        self._release = release

    # -- identity -------------------------------------------------------

    @property
    def id(self) -> int:
        return self.info.id

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def is_dma_buf(self) -> bool:
        return self.info.backend in (Backend.DMA_HEAP, Backend.UDMABUF)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("buffer is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Buffer {self.id} {self.info.heap} {self.size} bytes {state}>"

    # -- CPU access -----------------------------------------------------

    def sync(self, access: Access, end: bool) -> None:
        """DMA_BUF_IOCTL_SYNC start or end for `access`; a no-op for memfd."""
        if not self.is_dma_buf:
            return
        flags = uapi.SyncFlags.END if end else uapi.SyncFlags.START
        if Access.READ in access:
            flags |= uapi.SyncFlags.READ
        if Access.WRITE in access:
            flags |= uapi.SyncFlags.WRITE
        uapi.dma_buf_sync(self.fileno(), flags)

    @contextmanager
    def map(self, access: Access = Access.RW) -> Iterator[Mapping]:
        """Map the buffer for CPU access in `access` directions."""
        prot = (mmap.PROT_READ if Access.READ in access else 0) | (mmap.PROT_WRITE if Access.WRITE in access else 0)
        region = mmap.mmap(self.fileno(), self.size, mmap.MAP_SHARED, prot or mmap.PROT_READ)
        mapping = Mapping(region, Access.WRITE in access)
        try:
            self.sync(access, end=False)
        except BaseException:
            region.close()
            raise
        try:
            yield mapping
        finally:
            self.sync(access, end=True)
            if not mapping._release():
                # The mapping stays until the last array over it is gone.
                raise BufferError("an array or view over the mapping outlived map(); copy what you keep")
            region.close()

    # -- lifetime -------------------------------------------------------

    def close(self) -> None:
        """Close the fd and release the buffer in the daemon's books.
        Copies of the fd given to other processes stay valid (and keep the
        buffer charged to this uid while they live). The fd is closed first:
        a buffer released while this process still holds it stays charged
        until the daemon sees it gone."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        finally:
            if self._release is not None:
                self._release(self)

    def detach(self) -> int:
        """Take the fd out of this object (the caller closes it); the
        buffer stays in the daemon's books until the session ends."""
        fd, self._fd = self._fd, -1
        self._release = None
        return fd

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
