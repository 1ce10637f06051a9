"""The file the benchmark loads: a verifiable pattern on a filesystem that takes O_DIRECT.

Pattern: every 4 KiB block starts with its block index (u64, little-endian) followed by 4088
bytes of fixed pseudo-random filler, so a misplaced, stale or zero block is caught by reading
eight bytes, and the data does not compress. A file the user names with --file is checked
against its own bytes instead (read with pread, outside the timed sections).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

BLOCK = 4096
_WORDS_PER_BLOCK = BLOCK // 8
_WRITE_BYTES = 8 << 20
_FILLER = hashlib.shake_256(b"dmabufd bench.load_modes").digest(BLOCK)
SCRATCH_ENV = "DMABUFD_VM_SCRATCH"


def pattern_bytes(offset: int, length: int) -> bytes:
    """The pattern's bytes at [offset, offset + length)."""
    first = offset // BLOCK
    last = (offset + length + BLOCK - 1) // BLOCK
    blocks = fill_pattern(bytearray((last - first) * BLOCK), first)
    start = offset - first * BLOCK
    return bytes(blocks[start : start + length])


def fill_pattern(buffer: bytearray, first_block: int) -> bytearray:
    """Fill `buffer` (a whole number of blocks) with the pattern from block `first_block` on."""
    count = len(buffer) // BLOCK
    buffer[:] = _FILLER * count
    words = memoryview(buffer).cast("Q")
    words[::_WORDS_PER_BLOCK] = memoryview(array("Q", range(first_block, first_block + count)))
    words.release()
    return buffer


def write_pattern_file(path: Path, size: int) -> str:
    """Create `path` with `size` bytes of the pattern (large writes, fsync); returns its sha256."""
    if size <= 0 or size % BLOCK:
        raise ValueError(f"the test file size must be a positive multiple of {BLOCK}: {size}")
    digest = hashlib.sha256()
    chunk = bytearray(min(size, _WRITE_BYTES))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        offset = 0
        while offset < size:
            length = min(len(chunk), size - offset)
            if length != len(chunk):
                chunk = bytearray(length)
            fill_pattern(chunk, offset // BLOCK)
            view = memoryview(chunk)
            written = 0
            while written < length:
                written += os.pwrite(fd, view[written:], offset + written)
            view.release()
            digest.update(chunk)
            offset += length
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def file_sha256(path: Path, length: int) -> str:
    """sha256 of the first `length` bytes of `path` (buffered reads)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        remaining = length
        while remaining:
            data = handle.read(min(_WRITE_BYTES, remaining))
            if not data:
                raise OSError(errno.EIO, f"{path} is shorter than {length} bytes")
            digest.update(data)
            remaining -= len(data)
    return digest.hexdigest()


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (longest mount point prefix)."""
    target = str(path.resolve())
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def probe_o_direct(path: Path) -> str | None:
    """None when an O_DIRECT read of the file's first block works; else why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as error:
        return f"open(O_DIRECT) failed: {errno.errorcode.get(error.errno or 0, error.errno)} ({error.strerror})"
    try:
        with mmap.mmap(-1, BLOCK) as aligned:
            view = memoryview(aligned)
            try:
                os.preadv(fd, [view], 0)
            finally:
                view.release()
    except OSError as error:
        return f"an O_DIRECT read failed: {errno.errorcode.get(error.errno or 0, error.errno)} ({error.strerror})"
    finally:
        os.close(fd)
    return None


def default_dir() -> Path:
    """$DMABUFD_VM_SCRATCH inside the VM (ext4 on virtio-blk), else /var/tmp."""
    scratch = os.environ.get(SCRATCH_ENV)
    return Path(scratch) if scratch else Path("/var/tmp")


@dataclass
class SourceFile:
    """The file under test and what is known about it."""

    path: Path
    size: int  # bytes the benchmark loads (a multiple of BLOCK)
    generated: bool  # written by us with the pattern
    remove: bool  # delete at the end
    fs_type: str
    sha256: str | None  # of the first `size` bytes, when known
    notes: list[str]

    def expected(self, offset: int, length: int, fd: int) -> bytes:
        """What the file holds at [offset, offset + length); `fd` reads a foreign file."""
        if self.generated:
            return pattern_bytes(offset, length)
        return os.pread(fd, length, offset)

    def cleanup(self) -> None:
        if self.remove:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()


class NoDirectIO(Exception):
    """The filesystem refuses O_DIRECT: the direct modes cannot be measured there."""


def prepare(file: Path | None, size: int, directory: Path | None, want_sha256: bool) -> SourceFile:
    """Use `file` (created with `size` bytes of pattern if it does not exist), or write a
    temporary pattern file of `size` bytes under `directory` (removed by cleanup())."""
    notes: list[str] = []
    if file is not None and file.exists():
        if not file.is_file():
            raise ValueError(f"{file} is not a regular file")
        full = file.stat().st_size
        usable = full // BLOCK * BLOCK
        if usable == 0:
            raise ValueError(f"{file} is shorter than one {BLOCK}-byte block")
        if usable != full:
            notes.append(f"the last {full - usable} bytes (not a whole {BLOCK}-byte block) are not loaded")
        test = SourceFile(file, usable, False, False, fs_type(file), None, notes)
    else:
        if file is not None:
            path, remove = file, False
        else:
            parent = directory if directory is not None else default_dir()
            path, remove = Path(tempfile.mkdtemp(prefix="dmabufd-bench-", dir=parent)) / "load.bin", True
        test = SourceFile(path, size, True, remove, fs_type(path.parent), None, notes)
        try:
            test.sha256 = write_pattern_file(path, size)
        except BaseException:
            test.cleanup()
            raise
    why = probe_o_direct(test.path)
    if why is not None:
        test.cleanup()
        hint = " (tmpfs takes O_DIRECT only from Linux 6.6 on)" if test.fs_type == "tmpfs" else ""
        raise NoDirectIO(
            f"{test.path} is on {test.fs_type}, where {why}{hint}: the direct modes need O_DIRECT; "
            "pass --dir on a disk filesystem (ext4, xfs, f2fs, btrfs)"
        )
    if test.fs_type == "tmpfs":
        notes.append("the file is on tmpfs: no storage behind it, every mode measures memory copies")
    if want_sha256 and test.sha256 is None:
        test.sha256 = file_sha256(test.path, test.size)
    return test
