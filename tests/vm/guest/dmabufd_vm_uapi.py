"""Plain-Python access to the dma-buf, dma-heap and udmabuf uAPI (Linux 6.12) for guest tests.

Deliberately independent of the service package: os, fcntl, mmap and struct only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

PAGE = mmap.PAGESIZE

# ---- ioctl number encoding (asm-generic/ioctl.h; x86-64 and arm64)
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, typ: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(typ) << 8) | nr


def _iow(typ: str, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, typ, nr, size)


def _iowr(typ: str, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, size)


# ---- dma-heap
HEAP_DIR = Path("/dev/dma_heap")
SYSTEM_HEAP = HEAP_DIR / "system"
ALLOC_FMT = "=QIIQ"  # len, fd, fd_flags, heap_flags
DMA_HEAP_IOCTL_ALLOC = _iowr("H", 0, struct.calcsize(ALLOC_FMT))
assert DMA_HEAP_IOCTL_ALLOC == 0xC0184800

# ---- dma-buf
DMA_BUF_SYNC_READ, DMA_BUF_SYNC_WRITE = 1, 2
DMA_BUF_SYNC_RW = 3
DMA_BUF_SYNC_START, DMA_BUF_SYNC_END = 0, 4
DMA_BUF_IOCTL_SYNC = _iow("b", 0, 8)
DMA_BUF_SET_NAME_A = _iow("b", 1, 4)
DMA_BUF_SET_NAME_B = _iow("b", 1, 8)
assert DMA_BUF_IOCTL_SYNC == 0x40086200
assert DMA_BUF_SET_NAME_B == 0x40086201
DMA_BUF_NAME_LEN = 32

# ---- udmabuf
UDMABUF_DEV = Path("/dev/udmabuf")
UDMABUF_PARAMS = Path("/sys/module/udmabuf/parameters")
UDMABUF_FLAGS_CLOEXEC = 0x01
CREATE_FMT = "=IIQQ"  # memfd, flags, offset, size
ITEM_FMT = "=IIQQ"  # memfd, __pad, offset, size
LIST_HDR_FMT = "=II"  # flags, count
UDMABUF_CREATE = _iow("u", 0x42, struct.calcsize(CREATE_FMT))
UDMABUF_CREATE_LIST = _iow("u", 0x43, struct.calcsize(LIST_HDR_FMT))

# ---- memfd seals (fcntl.F_ADD_SEALS etc. exist since Python 3.8 on Linux)
F_ADD_SEALS = fcntl.F_ADD_SEALS
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8


def heap_alloc(
    heap_fd: int,
    length: int,
    *,
    fd_flags: int = os.O_RDWR | os.O_CLOEXEC,
    heap_flags: int = 0,
    struct_size: int | None = None,
    fd_in: int = 0,
) -> int:
    """DMA_HEAP_IOCTL_ALLOC; `struct_size` encodes an older (16) or newer (>24) struct."""
    data = bytearray(struct.pack(ALLOC_FMT, length, fd_in, fd_flags, heap_flags))
    size = len(data) if struct_size is None else struct_size
    if size < len(data):
        data = data[:size]
    elif size > len(data):
        # the "newer" struct of the upstream selftest: trailing garbage fields
        extra = bytearray(size - len(data))
        for i in range(0, len(extra) - 7, 8):
            extra[i : i + 8] = struct.pack("=Q", (0xFFFFFFFF, 0x88888888, 0x11111111)[(i // 8) % 3])
        data += extra
    fcntl.ioctl(heap_fd, _iowr("H", 0, size), data, True)
    return int(struct.unpack_from("=I", data, 8)[0])


@contextlib.contextmanager
def open_heap(path: Path = SYSTEM_HEAP) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def alloc_system(length: int) -> int:
    with open_heap() as hfd:
        return heap_alloc(hfd, length)


def sync(buf_fd: int, flags: int) -> None:
    arg = bytearray(struct.pack("=Q", flags))
    while True:
        try:
            fcntl.ioctl(buf_fd, DMA_BUF_IOCTL_SYNC, arg, True)
            return
        except InterruptedError:
            continue
        except BlockingIOError:
            continue


@contextlib.contextmanager
def cpu_access(buf_fd: int, direction: int = DMA_BUF_SYNC_RW) -> Iterator[None]:
    sync(buf_fd, DMA_BUF_SYNC_START | direction)
    try:
        yield
    finally:
        sync(buf_fd, DMA_BUF_SYNC_END | direction)


def set_name(buf_fd: int, name: str | bytes, request: int = DMA_BUF_SET_NAME_B) -> None:
    raw = name.encode() if isinstance(name, str) else name
    # The ioctl argument is the string's address: a mutable buffer is passed by pointer.
    fcntl.ioctl(buf_fd, request, bytearray(raw + b"\0"), True)


def fdinfo(fd: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


def buf_size(buf_fd: int) -> int:
    return os.lseek(buf_fd, 0, os.SEEK_END)


def map_buf(buf_fd: int, length: int, *, write: bool = True) -> mmap.mmap:
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
    return mmap.mmap(buf_fd, length, mmap.MAP_SHARED, prot)


# ---- memfd / udmabuf


def sealed_memfd(size: int, *, seals: int = F_SEAL_SHRINK, name: str = "dmabufd-test") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    return fd


def udmabuf_create(dev_fd: int, memfd: int, offset: int, size: int, flags: int = UDMABUF_FLAGS_CLOEXEC) -> int:
    data = bytearray(struct.pack(CREATE_FMT, memfd, flags, offset, size))
    return int(fcntl.ioctl(dev_fd, UDMABUF_CREATE, data, True))


def udmabuf_create_list(dev_fd: int, items: Sequence[tuple[int, int, int]], flags: int = UDMABUF_FLAGS_CLOEXEC) -> int:
    data = bytearray(struct.pack(LIST_HDR_FMT, flags, len(items)))
    for memfd, offset, size in items:
        data += struct.pack(ITEM_FMT, memfd, 0, offset, size)
    return int(fcntl.ioctl(dev_fd, UDMABUF_CREATE_LIST, data, True))


def udmabuf_param(name: str) -> int:
    return int((UDMABUF_PARAMS / name).read_text().strip())


@contextlib.contextmanager
def udmabuf_size_limit_at_least(mb: int) -> Iterator[int]:
    """Raise udmabuf.size_limit_mb (a 0644 module parameter) for the duration, then restore."""
    path = UDMABUF_PARAMS / "size_limit_mb"
    old = udmabuf_param("size_limit_mb")
    if old < mb:
        path.write_text(str(mb))
    try:
        yield max(old, mb)
    finally:
        if old < mb:
            path.write_text(str(old))


# ---- copy_file_range


def copy_range_all(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> int:
    """copy_file_range until `length` bytes moved, looping on short transfers.

    Returns the number of calls made. Raises OSError as the kernel reports it; a zero-byte
    transfer before the end is an error (EOF of the source).
    """
    calls = 0
    done = 0
    while done < length:
        n = os.copy_file_range(src_fd, dst_fd, length - done, src_off + done, dst_off + done)
        calls += 1
        if n == 0:
            raise OSError(errno.EIO, f"copy_file_range moved 0 bytes after {done}/{length}")
        done += n
    return calls


@contextlib.contextmanager
def expect_errno(code: int) -> Iterator[None]:
    """Assert that the block raises OSError with exactly this errno."""
    try:
        yield
    except OSError as e:
        if e.errno != code:
            raise AssertionError(
                f"expected {errno.errorcode[code]}, got {errno.errorcode.get(e.errno or 0)}: {e!r}"
            ) from e
        return
    raise AssertionError(f"expected OSError {errno.errorcode[code]}, nothing was raised")


def drop_caches() -> None:
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
