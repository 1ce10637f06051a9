"""copy_file_range between files on ext4 and f2fs and dma-bufs (system heap, udmabuf).

On the patched kernel (kernel-patches/linux-6.12) the transfer is done by the exporter, direct
when the source fd is O_DIRECT: contents must be byte-identical (sha256) for 4 KiB .. 256 MiB,
with odd offsets and lengths loaded the documented way (aligned middle through the O_DIRECT fd,
unaligned head/tail through a buffered fd of the same file), looping on short transfers, on the
ext4 scratch disk and on the f2fs disk alike. An O_DIRECT request the file system would quietly
do through the page cache (f2fs: aligned to 512 bytes but not to its 4 KiB block) fails with
EINVAL instead; files that are not on a block device (procfs, sysfs, debugfs, a memfd) are
refused with EXDEV in both directions.
On the stock kernel the same calls fail with EINVAL: that is what the product's fallback
detection keys on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.guest.dmabufd_vm_uapi import (
    DMA_BUF_SYNC_READ,
    DMA_BUF_SYNC_WRITE,
    HEAP_DIR,
    PAGE,
    UDMABUF_DEV,
    alloc_system,
    buf_size,
    copy_range_all,
    cpu_access,
    drop_caches,
    expect_errno,
    heap_alloc,
    map_buf,
    open_heap,
    sealed_memfd,
    udmabuf_create,
    udmabuf_size_limit_at_least,
)

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 4096  # page alignment: always enough for O_DIRECT on the ext4 scratch disk
FILE_SIZE = 256 * MiB + 64 * KiB
STOCK_ERRNO = errno.EINVAL  # copy_file_range(file, dma-buf) on an unpatched 6.12

# ---- the source file: each 1 MiB block is a rotation of one random MiB (misplacement shows)
_BASE = hashlib.shake_256(b"dmabufd-vm-cfr").digest(MiB)


def content(off: int, length: int) -> Iterator[bytes]:
    """The bytes of the source file at [off, off+length), in pieces."""
    end = off + length
    while off < end:
        block, inner = divmod(off, MiB)
        rot = (block * 4099) % MiB
        data = _BASE[rot:] + _BASE[:rot]
        piece = data[inner : min(MiB, inner + end - off)]
        yield piece
        off += len(piece)


_digests: dict[tuple[int, int], str] = {}


def expected_digest(off: int, length: int) -> str:
    key = (off, length)
    if key not in _digests:
        h = hashlib.sha256()
        for piece in content(off, length):
            h.update(piece)
        _digests[key] = h.hexdigest()
    return _digests[key]


def _write_source(directory: Path) -> Path:
    path = directory / "cfr-source.bin"
    with open(path, "wb") as fh:
        for piece in content(0, FILE_SIZE):
            fh.write(piece)
        fh.flush()
        os.fsync(fh.fileno())
    drop_caches()
    return path


def f2fs_dir() -> Path:
    """The f2fs disk the harness attaches next to the ext4 scratch disk."""
    mount = os.environ.get("DMABUFD_VM_F2FS")
    if not mount or not Path(mount).is_dir():
        pytest.fail("no f2fs disk in this guest (DMABUFD_VM_F2FS): the suite attaches one")
    d = Path(mount) / f"guest-tests-{os.getpid()}"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def source_file(scratch_dir: Path) -> Path:
    """The source on ext4, for the cases that do not depend on the file system."""
    return _write_source(scratch_dir)


@pytest.fixture(scope="module", params=["ext4", "f2fs"])
def fs_source(request: pytest.FixtureRequest, source_file: Path) -> Iterator[Path]:
    """The source on each file system Android loads weights from."""
    if request.param == "ext4":
        yield source_file
        return
    path = _write_source(f2fs_dir())
    yield path
    path.unlink()


def dio_alignment(path: Path) -> int:
    """STATX_DIOALIGN's offset alignment of the file (0: no direct I/O at all)."""
    buf = ctypes.create_string_buffer(256)  # struct statx
    if _libc.statx(-100, os.fsencode(path), 0, STATX_DIOALIGN, buf) != 0:  # AT_FDCWD
        raise OSError(ctypes.get_errno(), "statx")
    mask, offset_align = int.from_bytes(buf.raw[0:4], "little"), int.from_bytes(buf.raw[156:160], "little")
    assert mask & STATX_DIOALIGN, f"{path}: the file system reports no direct I/O alignment"
    return offset_align


# ---- destinations


class Target:
    """A dma-buf to load into, and how to look at its bytes."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.size = size
        self.memfd = -1
        self._stack = contextlib.ExitStack()
        if kind == "heap":
            self.fd = alloc_system(size)
        else:
            self.memfd = sealed_memfd(size)
            self._stack.enter_context(udmabuf_size_limit_at_least(-(-size // MiB)))
            dev = os.open(UDMABUF_DEV, os.O_RDWR | os.O_CLOEXEC)
            try:
                self.fd = udmabuf_create(dev, self.memfd, 0, size)
            finally:
                os.close(dev)

    def close(self) -> None:
        os.close(self.fd)
        if self.memfd >= 0:
            os.close(self.memfd)
        self._stack.close()

    def digest(self, off: int, length: int) -> str:
        h = hashlib.sha256()
        with map_buf(self.fd, self.size, write=False) as mm, cpu_access(self.fd, DMA_BUF_SYNC_READ):
            view = memoryview(mm)
            try:
                for start in range(off, off + length, 16 * MiB):
                    h.update(view[start : min(off + length, start + 16 * MiB)])
            finally:
                view.release()
        return h.hexdigest()

    def zero_outside(self, off: int, length: int) -> bool:
        with map_buf(self.fd, self.size, write=False) as mm, cpu_access(self.fd, DMA_BUF_SYNC_READ):
            head_ok = mm[:off].count(0) == off
            tail_ok = mm[off + length :].count(0) == self.size - off - length
        return bool(head_ok and tail_ok)

    def memfd_digest(self, off: int, length: int) -> str:
        h = hashlib.sha256()
        pos = off
        while pos < off + length:
            data = os.pread(self.memfd, min(16 * MiB, off + length - pos), pos)
            h.update(data)
            pos += len(data)
        return h.hexdigest()


TargetFactory = Callable[[int], Target]


@pytest.fixture(params=["heap", "udmabuf"])
def make_target(request: pytest.FixtureRequest) -> Iterator[TargetFactory]:
    made: list[Target] = []

    def factory(size: int) -> Target:
        t = Target(str(request.param), -(-size // PAGE) * PAGE)
        made.append(t)
        return t

    yield factory
    for t in made:
        t.close()


# ---- the loading contract (what a caller of the patched kernel does)


def load(path: Path, file_off: int, dst_fd: int, dst_off: int, length: int) -> dict[str, int]:
    """Aligned middle through an O_DIRECT fd; unaligned head/tail (or a range whose file and
    buffer offsets are not congruent modulo the block) through a buffered fd."""
    stats = {"direct": 0, "buffered": 0, "calls": 0}
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    bfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if (file_off - dst_off) % BLOCK:
            head, mid = length, 0
        else:
            head = min(length, (-file_off) % BLOCK)
            mid = (length - head) // BLOCK * BLOCK
        tail = length - head - mid
        for fd, kind, f_off, d_off, n in (
            (bfd, "buffered", file_off, dst_off, head),
            (dfd, "direct", file_off + head, dst_off + head, mid),
            (bfd, "buffered", file_off + head + mid, dst_off + head + mid, tail),
        ):
            if n:
                stats["calls"] += copy_range_all(fd, f_off, dst_fd, d_off, n)
                stats[kind] += n
    finally:
        os.close(dfd)
        os.close(bfd)
    return stats


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_char_p]
STATX_DIOALIGN = 0x2000


def cached_pages(path: Path, off: int, length: int) -> int:
    """How many pages of the file range are in the page cache (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = off // PAGE * PAGE
        span = -(-(off + length - start) // PAGE) * PAGE
        addr = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = ctypes.create_string_buffer(span // PAGE)
            if _libc.mincore(addr, span, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec.raw)
        finally:
            _libc.munmap(addr, span)
    finally:
        os.close(fd)


# ---- patched kernel


@pytest.fixture
def need_patched(patched: bool, vm_variant: str) -> None:
    if not patched:
        pytest.skip(f"direct copy_file_range needs the patched kernel (this is {vm_variant})")


SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 32 * MiB, 256 * MiB]


@pytest.mark.usefixtures("need_patched")
@pytest.mark.parametrize("size", SIZES, ids=["4K", "64K", "1M", "32M", "256M"])
def test_direct_copy_aligned(fs_source: Path, make_target: TargetFactory, size: int) -> None:
    source_file = fs_source
    file_off = 64 * KiB if size < 256 * MiB else 0
    t = make_target(size)
    drop_caches()
    stats = load(source_file, file_off, t.fd, 0, size)
    assert stats["direct"] == size
    assert stats["buffered"] == 0
    assert t.digest(0, size) == expected_digest(file_off, size)
    if t.kind == "udmabuf":
        assert t.memfd_digest(0, size) == expected_digest(file_off, size)
    if size >= 1 * MiB:  # O_DIRECT: the data did not go through the page cache
        assert cached_pages(source_file, file_off, size) <= size // PAGE // 100


ODD = [
    # (file offset, buffer offset, length)
    (0, 0, 64 * KiB + 1),
    (1000, 1000, 1 * MiB + 17),
    (3 * BLOCK + 5, 5, 32 * MiB + 4093),
    (123, 0, 64 * KiB),  # not congruent: all buffered
    (BLOCK, 2 * BLOCK, 1 * MiB),  # aligned, non-zero buffer offset
    (7, 4096 + 7, 4 * KiB - 9),  # inside one block
]


@pytest.mark.usefixtures("need_patched")
@pytest.mark.parametrize(("file_off", "dst_off", "length"), ODD, ids=[f"f{a}-b{b}-n{c}" for a, b, c in ODD])
def test_copy_odd_offsets_and_lengths(
    fs_source: Path, make_target: TargetFactory, file_off: int, dst_off: int, length: int
) -> None:
    t = make_target(dst_off + length + 3 * KiB)
    stats = load(fs_source, file_off, t.fd, dst_off, length)
    assert stats["direct"] + stats["buffered"] == length
    assert t.digest(dst_off, length) == expected_digest(file_off, length)
    assert t.zero_outside(dst_off, length), "bytes outside the copied range changed"


@pytest.mark.usefixtures("need_patched")
def test_direct_fd_unaligned_is_rejected(fs_source: Path, make_target: TargetFactory) -> None:
    t = make_target(1 * MiB)
    dfd = os.open(fs_source, os.O_RDONLY | os.O_DIRECT)
    try:
        for f_off, d_off, n in ((1, 0, 64 * KiB), (0, 1, 64 * KiB), (0, 0, 4097)):
            with expect_errno(errno.EINVAL):
                os.copy_file_range(dfd, t.fd, n, f_off, d_off)
    finally:
        os.close(dfd)


@pytest.mark.usefixtures("need_patched")
def test_direct_fd_sub_block_alignment(fs_source: Path, make_target: TargetFactory) -> None:
    """512-byte aligned, not 4 KiB: ext4 (direct I/O alignment: the disk's 512-byte block) does
    it directly; f2fs (alignment: its 4 KiB block) would go through the page cache, so the copy
    is refused. Neither touches the page cache."""
    align = dio_alignment(fs_source)
    file_off, dst_off, length = 3 * 512, 5 * 512, 64 * KiB + 512
    t = make_target(1 * MiB)
    drop_caches()
    dfd = os.open(fs_source, os.O_RDONLY | os.O_DIRECT)
    try:
        if align <= 512:
            assert copy_range_all(dfd, file_off, t.fd, dst_off, length) >= 1
            assert t.digest(dst_off, length) == expected_digest(file_off, length)
        else:
            with expect_errno(errno.EINVAL):
                os.copy_file_range(dfd, t.fd, length, file_off, dst_off)
    finally:
        os.close(dfd)
    assert cached_pages(fs_source, 0, 1 * MiB) == 0, "an O_DIRECT copy went through the page cache"


def test_f2fs_alignment_is_its_block(fs_source: Path) -> None:
    """What the test above relies on: the two file systems report different alignments."""
    expected = {"ext4": 512, "f2fs": 4096}[_fs_of(fs_source)]
    assert dio_alignment(fs_source) == expected


def _fs_of(path: Path) -> str:
    """ext4 or f2fs, from /proc/mounts (longest mount point above the path)."""
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, kind, *_ = line.split()
        if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
            best, fstype = mnt, kind
    return fstype


@pytest.mark.usefixtures("need_patched")
def test_count_clamped_at_buffer_end(source_file: Path, make_target: TargetFactory) -> None:
    t = make_target(1 * MiB)
    dfd = os.open(source_file, os.O_RDONLY | os.O_DIRECT)
    try:
        moved = 0
        while True:  # asks for 2 MiB into a 1 MiB buffer: loops over short transfers, ends at 0
            n = os.copy_file_range(dfd, t.fd, 2 * MiB - moved, moved, moved)
            if n == 0:
                break
            moved += n
            assert moved <= 1 * MiB
        assert moved == 1 * MiB
        assert os.copy_file_range(dfd, t.fd, BLOCK, 0, 1 * MiB) == 0  # at the end: 0 bytes
        assert t.digest(0, 1 * MiB) == expected_digest(0, 1 * MiB)
    finally:
        os.close(dfd)


@pytest.mark.usefixtures("need_patched")
def test_buffered_fd_copy_goes_through_page_cache(source_file: Path, make_target: TargetFactory) -> None:
    t = make_target(4 * MiB)
    drop_caches()
    bfd = os.open(source_file, os.O_RDONLY)
    try:
        copy_range_all(bfd, 8 * MiB, t.fd, 0, 4 * MiB)
    finally:
        os.close(bfd)
    assert t.digest(0, 4 * MiB) == expected_digest(8 * MiB, 4 * MiB)
    assert cached_pages(source_file, 8 * MiB, 4 * MiB) >= (4 * MiB // PAGE) * 9 // 10


@pytest.mark.usefixtures("need_patched")
def test_read_only_dmabuf_fd_rejected(source_file: Path) -> None:

    with open_heap() as hfd:
        fd = heap_alloc(hfd, MiB, fd_flags=os.O_RDONLY | os.O_CLOEXEC)
    dfd = os.open(source_file, os.O_RDONLY | os.O_DIRECT)
    try:
        with expect_errno(errno.EBADF):
            os.copy_file_range(dfd, fd, MiB, 0, 0)
    finally:
        os.close(dfd)
        os.close(fd)


def _fill(t: Target, file_off: int) -> None:
    """Write the source file's bytes at file_off.. into the whole buffer through its mapping."""
    with map_buf(t.fd, t.size) as mm, cpu_access(t.fd, DMA_BUF_SYNC_WRITE):
        pos = 0
        for piece in content(file_off, t.size):
            mm[pos : pos + len(piece)] = piece
            pos += len(piece)


@pytest.mark.usefixtures("need_patched")
@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_save_buffer_to_file(fs_source: Path, make_target: TargetFactory, direct: bool) -> None:
    size = 4 * MiB
    t = make_target(size)
    _fill(t, 5 * MiB)
    out = fs_source.parent / f"save-{t.kind}-{int(direct)}.bin"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o600)
    try:
        copy_range_all(t.fd, 0, fd, 0, size)  # the dma-buf is the source
    finally:
        os.close(fd)
    assert out.stat().st_size == size
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected_digest(5 * MiB, size)
    out.unlink()


@pytest.mark.usefixtures("need_patched")
def test_whole_file_with_partial_last_block(fs_source: Path, make_target: TargetFactory) -> None:
    size = 3 * MiB + 1234
    path = fs_source.parent / "odd-size.bin"
    with open(path, "wb") as fh:
        for piece in content(7 * MiB, size):
            fh.write(piece)
    t = make_target(size)
    drop_caches()
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        # the VFS shortens the copy at EOF: the partial last block is misaligned for O_DIRECT
        with expect_errno(errno.EINVAL):
            os.copy_file_range(dfd, t.fd, 2 * BLOCK, 3 * MiB, 3 * MiB)
        assert os.copy_file_range(dfd, t.fd, BLOCK, size + 10 * BLOCK, 0) == 0  # past EOF
    finally:
        os.close(dfd)
    stats = load(path, 0, t.fd, 0, size)
    assert stats["direct"] == 3 * MiB
    assert stats["buffered"] == 1234
    assert t.digest(0, size) == expected_digest(7 * MiB, size)
    assert t.zero_outside(0, size)
    path.unlink()


@pytest.mark.usefixtures("need_patched")
def test_exporter_without_file_io(source_file: Path) -> None:
    others = sorted(p for p in HEAP_DIR.iterdir() if p.name != "system")
    if not others:
        pytest.skip("no dma-heap other than system (the CMA heap 'reserved' is expected)")
    with open_heap(others[0]) as hfd:
        fd = heap_alloc(hfd, MiB)
    dfd = os.open(source_file, os.O_RDONLY | os.O_DIRECT)
    try:
        with expect_errno(errno.EOPNOTSUPP):
            os.copy_file_range(dfd, fd, MiB, 0, 0)
    finally:
        os.close(dfd)
        os.close(fd)


@pytest.mark.usefixtures("need_patched")
def test_rejected_combinations(source_file: Path, scratch_dir: Path, make_target: TargetFactory) -> None:
    t = make_target(MiB)
    other = make_target(MiB)
    dfd = os.open(source_file, os.O_RDONLY | os.O_DIRECT)
    wfd = os.open(scratch_dir / "wronly.bin", os.O_WRONLY | os.O_CREAT, 0o600)
    afd = os.open(scratch_dir / "append.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    dirfd = os.open(scratch_dir, os.O_RDONLY | os.O_DIRECTORY)
    r, w = os.pipe()
    try:
        with expect_errno(errno.EBADF):  # source not open for reading
            os.copy_file_range(wfd, t.fd, BLOCK, 0, 0)
        with expect_errno(errno.EBADF):  # destination O_APPEND
            os.copy_file_range(t.fd, afd, BLOCK, 0, 0)
        with expect_errno(errno.EINVAL):  # dma-buf on both sides
            os.copy_file_range(other.fd, t.fd, BLOCK, 0, 0)
        os.write(w, b"x" * BLOCK)
        with expect_errno(errno.EINVAL):  # a pipe
            os.copy_file_range(r, t.fd, BLOCK, None, 0)
        with expect_errno(errno.EISDIR):
            os.copy_file_range(dirfd, t.fd, BLOCK, 0, 0)
        assert os.copy_file_range(dfd, t.fd, BLOCK, 0, MiB) == 0  # at the end of the buffer
        assert os.copy_file_range(dfd, t.fd, 4 * BLOCK, 0, MiB - BLOCK) == BLOCK  # clamped
    finally:
        for fd in (dfd, wfd, afd, dirfd, r, w):
            os.close(fd)


# ---- files that are not on a block device: pseudo files and memory


def _buffer_holding(make_target: TargetFactory, text: bytes) -> Target:
    t = make_target(64 * KiB)
    with map_buf(t.fd, t.size) as mm, cpu_access(t.fd, DMA_BUF_SYNC_WRITE):
        mm[: len(text)] = text
    return t


PSEUDO_SOURCES = {
    "procfs": Path("/proc/self/status"),
    "sysfs": Path("/sys/module/udmabuf/parameters/list_limit"),
    "debugfs": Path("/sys/kernel/debug/dma_buf/bufinfo"),
}


@pytest.mark.parametrize("kind", sorted(PSEUDO_SOURCES))
def test_pseudo_file_source_refused(make_target: TargetFactory, patched: bool, kind: str) -> None:
    """v1 of the series read sysfs files and returned 0 (end of file) for proc and debugfs ones."""
    path = PSEUDO_SOURCES[kind]
    assert path.exists(), f"{path} missing in the guest"
    t = make_target(64 * KiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        with expect_errno(errno.EXDEV if patched else STOCK_ERRNO):
            os.copy_file_range(fd, t.fd, 4 * KiB, 0, 0)
    finally:
        os.close(fd)
    assert t.zero_outside(0, 0)


@pytest.mark.parametrize(
    ("path", "text"),
    [(Path("/proc/sys/kernel/hostname"), b"dmabuf-wrote-this"), (PSEUDO_SOURCES["sysfs"], b"999\n")],
    ids=["sysctl", "sysfs-parameter"],
)
def test_pseudo_file_destination_refused(make_target: TargetFactory, patched: bool, path: Path, text: bytes) -> None:
    """v1 of the series changed the hostname and the module parameter from a dma-buf."""
    before = path.read_bytes()
    t = _buffer_holding(make_target, text)
    fd = os.open(path, os.O_WRONLY)
    try:
        with expect_errno(errno.EXDEV if patched else STOCK_ERRNO):
            os.copy_file_range(t.fd, fd, len(text), 0, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == before


def test_memfd_refused_both_ways(make_target: TargetFactory, patched: bool) -> None:
    """tmpfs is not block-backed: a memfd on either side is refused (dmabufd's probe relies on
    EXDEV here to tell the series' kernel from a stock one, which says EINVAL)."""
    t = make_target(64 * KiB)
    memfd = sealed_memfd(64 * KiB)
    try:
        with expect_errno(errno.EXDEV if patched else STOCK_ERRNO):
            os.copy_file_range(memfd, t.fd, 4 * KiB, 0, 0)
        with expect_errno(errno.EXDEV if patched else STOCK_ERRNO):
            os.copy_file_range(t.fd, memfd, 4 * KiB, 0, 0)
    finally:
        os.close(memfd)


# ---- stock kernel


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_stock_kernel_refuses_saving(
    scratch_dir: Path, make_target: TargetFactory, patched: bool, direct: bool
) -> None:
    if patched:
        pytest.skip("the stock behaviour is checked on the stock kernel")
    t = make_target(1 * MiB)
    out = scratch_dir / "stock-save.bin"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o600)
    try:
        with expect_errno(STOCK_ERRNO):
            os.copy_file_range(t.fd, fd, 1 * MiB, 0, 0)
    finally:
        os.close(fd)
        out.unlink()


def test_stock_kernel_refuses_any_heap(source_file: Path, patched: bool) -> None:
    if patched:
        pytest.skip("the stock behaviour is checked on the stock kernel")
    dfd = os.open(source_file, os.O_RDONLY | os.O_DIRECT)
    try:
        for heap in sorted(HEAP_DIR.iterdir()):
            with open_heap(heap) as hfd:
                fd = heap_alloc(hfd, MiB)
            try:
                with expect_errno(STOCK_ERRNO):
                    os.copy_file_range(dfd, fd, MiB, 0, 0)
            finally:
                os.close(fd)
    finally:
        os.close(dfd)


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "buffered"])
def test_stock_kernel_refuses(source_file: Path, make_target: TargetFactory, patched: bool, direct: bool) -> None:
    if patched:
        pytest.skip("the stock behaviour is checked on the stock kernel")
    t = make_target(1 * MiB)
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(source_file, flags)
    try:
        with expect_errno(STOCK_ERRNO):
            os.copy_file_range(fd, t.fd, 1 * MiB, 0, 0)
    finally:
        os.close(fd)
    assert buf_size(t.fd) == 1 * MiB
    assert t.zero_outside(0, 0)
