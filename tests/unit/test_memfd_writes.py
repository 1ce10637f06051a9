"""Every method that fills a memfd writes to it, never through a mapping:
a fault zeroes a fresh page before the copy fills it, and lanes faulting
pages on every core kept the daemon's other clients waiting for a CPU
(docs/loading.md, "No lane faults memfd pages in")."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmabufd.heaps.backend import Allocation, BackendKind
from dmabufd.loading import methods
from dmabufd.loading.method import Method, PartSource
from dmabufd.loading.methods import Piece, Source

SIZE = (6 << 20) + 123


@pytest.fixture
def data(tmp_path: Path) -> Iterator[tuple[int, int | None, bytes]]:
    """(buffered fd, O_DIRECT fd or None, the file's bytes)."""
    path = tmp_path / "weights.bin"
    payload = os.urandom(SIZE)
    path.write_bytes(payload)
    buffered = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        direct: int | None = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        direct = None
    try:
        yield buffered, direct, payload
    finally:
        os.close(buffered)
        if direct is not None:
            os.close(direct)


@pytest.fixture
def no_file_mappings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any mapping of a file by the methods; anonymous ones (the lanes'
    bounce buffers) stay allowed."""
    real = mmap.mmap

    def guarded(fd: int, *args: Any, **kwargs: Any) -> mmap.mmap:
        if fd != -1:
            raise AssertionError(f"fd {fd} was mapped")
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", guarded)


@pytest.mark.usefixtures("no_file_mappings")
@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("method", [Method.DIRECT_READ, Method.BUFFERED_READ])
def test_memfd_is_written_not_mapped(data: tuple[int, int | None, bytes], method: Method, cached: bool) -> None:
    buffered, direct, payload = data
    memfd = os.memfd_create("memfd-writes", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, SIZE)
        # Unaligned ends, offsets congruent modulo 4 KiB as the loader lays them.
        piece = Piece(5, 5, SIZE - 5 - 7)
        parts = methods.TRANSFERS[method](
            Source(buffered, direct), Allocation(memfd, SIZE, BackendKind.MEMFD), piece, cached
        )
        assert os.pread(memfd, piece.length, 5) == payload[5 : SIZE - 7]
        assert os.pread(memfd, 5, 0) == bytes(5), "bytes outside the piece stay as they were"
        assert sum(part.length for part, _ in parts) == piece.length
        sources = {where for _, where in parts}
        if cached:
            assert sources == {PartSource.PAGE_CACHE}
        elif method is Method.BUFFERED_READ or direct is None:
            assert sources == {PartSource.BUFFERED}
        else:
            assert sources == {PartSource.DEVICE, PartSource.BUFFERED}
    finally:
        os.close(memfd)
