"""Where a load's bytes come from: the page cache when it holds them, the
device (O_DIRECT) when it does not, and the lanes that feed fresh memory.

The host's own disk (ext4 on virtio-blk, kernel 6.18) has cachestat and
O_DIRECT, so both paths are real here; the VM suite covers the dma-buf
heaps."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

import dmabufd_client
from dmabufd.config import LoadingConfig, LoadProfile
from dmabufd.heaps.backend import BackendKind
from dmabufd.loading import page_cache
from dmabufd.loading.method import PartSource
from dmabufd.loading.methods import Piece
from dmabufd.loading.transfer import merge
from tests.conftest import DaemonFactory, run_as_rootless_client
from tests.integration.test_loading import loaded_bytes, make_file

SIZE = 48 << 20


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(8 << 20):
            pass


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "weights.bin"
    if os.major(path.parent.stat().st_dev) == 0:
        pytest.fail(f"{tmp_path} is not on a block device: this test needs the host's disk (O_DIRECT, cachestat)")
    return path, make_file(path, SIZE)


def test_cachestat_sees_what_the_page_cache_holds(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    drop_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert page_cache.cached_pages(fd, 0, SIZE) == 0
        assert not page_cache.fully_cached(fd, 0, 1 << 20)
        os.pread(fd, 4 << 20, 8 << 20)
        assert page_cache.fully_cached(fd, 8 << 20, 4 << 20)
    finally:
        os.close(fd)


def test_a_cold_file_comes_from_the_device(daemon_factory: DaemonFactory, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    daemon = daemon_factory()
    drop_cache(path)
    with daemon.connect() as client, client.load_file(path, offset=1, verify=True) as loaded:
        assert loaded_bytes(loaded) == data[1:]
        assert loaded.stats.bytes_from_cache == 0
        sources = {part.source for part in loaded.stats.parts}
        assert sources == {"device", "buffered"}, loaded.stats.parts  # the unaligned head is buffered
        assert sum(part.length for part in loaded.stats.parts) == SIZE - 1
        assert loaded.stats.parts[0] == dmabufd_client.LoadedPart(1, 4095, "buffered")


def test_a_warm_file_comes_from_the_page_cache(daemon_factory: DaemonFactory, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    daemon = daemon_factory()
    warm_cache(path)
    with daemon.connect() as client, client.load_file(path, verify=True) as loaded:
        assert loaded_bytes(loaded) == data
        assert loaded.stats.bytes_from_cache == SIZE
        assert [part.source for part in loaded.stats.parts] == ["page-cache"]


def test_a_half_cached_file_takes_each_path_where_it_applies(
    daemon_factory: DaemonFactory, data_file: tuple[Path, bytes]
) -> None:
    path, data = data_file
    daemon = daemon_factory("[loading]\nchunk_bytes = '4M'\n")
    drop_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        os.pread(fd, 16 << 20, 16 << 20)  # chunks 4..7 cached
    finally:
        os.close(fd)
    with daemon.connect() as client, client.load_file(path, verify=True) as loaded:
        assert loaded_bytes(loaded) == data
        cached = [part for part in loaded.stats.parts if part.source == "page-cache"]
        assert loaded.stats.bytes_from_cache >= 16 << 20
        assert any(part.file_offset <= 16 << 20 < part.file_offset + part.length for part in cached), cached
        assert any(part.source == "device" for part in loaded.stats.parts)


def test_page_cache_path_can_be_turned_off(daemon_factory: DaemonFactory, data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    daemon = daemon_factory("[loading]\npage_cache = false\n")
    warm_cache(path)
    with daemon.connect() as client, client.load_file(path, verify=True) as loaded:
        assert loaded_bytes(loaded) == data
        assert loaded.stats.bytes_from_cache == 0
        assert {part.source for part in loaded.stats.parts} == {"device"}


@pytest.mark.parametrize("cold", [True, False])
@pytest.mark.parametrize("method", ["direct-read", "buffered-read", "splice", "sendfile"])
def test_every_memfd_method_cold_and_warm(
    daemon_factory: DaemonFactory, data_file: tuple[Path, bytes], cold: bool, method: str
) -> None:
    path, data = data_file
    daemon = daemon_factory("[loading]\nchunk_bytes = '4M'\n")
    if cold:
        drop_cache(path)
    else:
        warm_cache(path)
    with daemon.connect() as client, client.load_file(path, offset=5, method=method, max_buffer_bytes="8M") as loaded:
        assert loaded_bytes(loaded) == data[5:]
        sources = {part.source for part in loaded.stats.parts}
        if not cold:
            assert sources == {"page-cache"}, sources
        else:  # (readahead may have brought later chunks in before their lane looked)
            assert ("buffered" if method == "buffered-read" else "device") in sources, sources


def test_profiles_per_kind_of_buffer() -> None:
    config = LoadingConfig(parallelism=4, chunk_bytes=8 << 20, kinds={"memfd": LoadProfile(16, 32 << 20)})
    assert config.profile("memfd") == LoadProfile(16, 32 << 20)
    assert config.profile("dma-heap") == LoadProfile(4, 8 << 20)
    assert BackendKind.DMA_HEAP.name.lower().replace("_", "-") == "dma-heap"


def test_parts_are_merged_in_file_order() -> None:
    parts = [
        (Piece(8, 8, 8), PartSource.DEVICE),
        (Piece(0, 0, 8), PartSource.DEVICE),
        (Piece(16, 16, 4), PartSource.PAGE_CACHE),
        (Piece(24, 24, 4), PartSource.PAGE_CACHE),
    ]
    assert merge(parts) == [
        (0, 16, PartSource.DEVICE),
        (16, 4, PartSource.PAGE_CACHE),
        (24, 4, PartSource.PAGE_CACHE),
    ]


def test_another_uid_learns_nothing_of_the_page_cache_of_a_file_it_may_only_read(
    daemon_factory: DaemonFactory, data_file: tuple[Path, bytes]
) -> None:
    """cachestat tells only a caller that may write the file or owns it.
    The daemon (root) may always ask: for a client that could not, a warm
    file's parts must not say what the page cache holds (the client could
    probe another uid's file reads without ever touching it)."""
    path, _ = data_file
    public = Path(tempfile.mkdtemp(prefix="dmabufd-cache-"))
    try:
        public.chmod(0o755)
        shared = public / "weights.bin"
        shared.write_bytes(path.read_bytes()[: 4 << 20])
        shared.chmod(0o644)
        warm_cache(shared)
        daemon = daemon_factory(public=True)
        body = (
            f"with open({str(shared)!r}, 'rb') as f, c.load_file(f) as loaded:\n"
            "    print(sorted({part.source for part in loaded.stats.parts}), loaded.stats.bytes_from_cache)\n"
        )
        result = run_as_rootless_client(daemon, body)
        assert result.returncode == 0, result.stderr
        assert "page-cache" not in result.stdout, result.stdout
        assert result.stdout.split()[-1] == "0", result.stdout
        with daemon.connect() as client, client.load_file(shared) as loaded:  # root may know
            assert loaded.stats.bytes_from_cache == 4 << 20
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_a_file_lease_does_not_hold_a_load(daemon_factory: DaemonFactory, data_file: tuple[Path, bytes]) -> None:
    """The daemon reopens a client's fd with O_DIRECT; a write lease on the
    file would make that open wait for the lease's holder (up to
    lease-break-time, 45 s by default). The reopen gives up at once, and
    the load reads the client's own fd."""
    path, data = data_file
    daemon = daemon_factory()
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease's break notice
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        began = time.monotonic()
        with daemon.connect() as client, client.load_file(fd, verify=True) as loaded:
            seconds = time.monotonic() - began
            assert loaded_bytes(loaded) == data
            assert "device" not in {part.source for part in loaded.stats.parts}
        assert seconds < 10, f"the load waited {seconds:.1f} s for the lease"
    finally:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        os.close(fd)
        signal.signal(signal.SIGIO, previous)


def test_an_fd_opened_with_o_direct_is_refused_with_a_reason(
    daemon_factory: DaemonFactory, data_file: tuple[Path, bytes]
) -> None:
    path, _ = data_file
    daemon = daemon_factory()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with daemon.connect() as client, pytest.raises(dmabufd_client.InvalidArgument, match="opened with O_DIRECT"):
            client.load_file(fd)
    finally:
        os.close(fd)
