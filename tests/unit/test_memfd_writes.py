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

from dmabufd.errors import FileChanged
from dmabufd.heaps.backend import Allocation, BackendKind
from dmabufd.loading import methods
from dmabufd.loading.method import Method, PartSource
from dmabufd.loading.methods import Piece, Source
from dmabufd_common import uapi

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
        # Unaligned ends; file and buffer offsets differ, congruent modulo
        # 4 KiB as the loader lays them out.
        piece = Piece(4096 + 5, 5, SIZE - 4096 - 5 - 7)
        parts = methods.TRANSFERS[method](
            Source(buffered, direct), Allocation(memfd, SIZE, BackendKind.MEMFD), piece, cached
        )
        assert os.pread(memfd, piece.length, 5) == payload[4096 + 5 : SIZE - 7]
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


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("method", [Method.DIRECT_READ, Method.BUFFERED_READ])
def test_a_file_shorter_than_the_piece_is_a_changed_file(
    data: tuple[int, int | None, bytes], method: Method, cached: bool
) -> None:
    buffered, direct, _ = data
    memfd = os.memfd_create("memfd-writes", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, 2 * SIZE)
        with pytest.raises(FileChanged, match="truncated while loading"):
            methods.TRANSFERS[method](
                Source(buffered, direct), Allocation(memfd, 2 * SIZE, BackendKind.MEMFD), Piece(0, 0, 2 * SIZE), cached
            )
    finally:
        os.close(memfd)


def test_a_heap_buffer_is_filled_through_a_synced_mapping(
    data: tuple[int, int | None, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heap buffers have no memfd behind them: buffered-read maps the
    dma-buf, bracketed by DMA_BUF_IOCTL_SYNC (a memfd stands in for it)."""
    buffered, direct, payload = data
    synced: list[uapi.SyncFlags] = []
    monkeypatch.setattr(uapi, "dma_buf_sync", lambda fd, flags: synced.append(flags))
    stand_in = os.memfd_create("heap-buffer", os.MFD_CLOEXEC)
    try:
        os.ftruncate(stand_in, SIZE)
        piece = Piece(0, 0, SIZE)
        methods.buffered_read(Source(buffered, direct), Allocation(stand_in, SIZE, BackendKind.DMA_HEAP), piece, False)
        assert os.pread(stand_in, SIZE, 0) == payload
        assert synced == [uapi.SyncFlags.START | uapi.SyncFlags.WRITE, uapi.SyncFlags.END | uapi.SyncFlags.WRITE]
    finally:
        os.close(stand_in)
