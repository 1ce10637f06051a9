"""LoadFile end to end: every method, odd ranges, splitting, progress,
cancellation, and the file-source rules (fds and paths)."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import dmabufd_client
from dmabufd.config import LoadingConfig
from dmabufd_client import Access, LoadedFile
from tests.conftest import ROOTLESS_UID, DaemonFactory, RunningDaemon, run_as_rootless_client

METHODS = ["direct-read", "sendfile", "splice", "buffered-read"]


def make_file(path: Path, size: int) -> bytes:
    """A file whose bytes all differ from their neighbours' (so any shift shows)."""
    block = os.urandom(min(size, 1 << 20))
    data = (block * (size // len(block) + 1))[:size] if size else b""
    path.write_bytes(data)
    return data


def loaded_bytes(loaded: LoadedFile) -> bytes:
    out = bytearray()
    for segment in sorted(loaded.segments, key=lambda s: s.file_offset):
        with loaded.buffer_of(segment).map(Access.READ) as mapping:
            view = mapping.memoryview
            out += view[segment.buffer_offset : segment.buffer_offset + segment.length]
            del view
    return bytes(out)


@pytest.fixture
def baseline(daemon: RunningDaemon) -> Iterator[int]:
    with daemon.connect() as warmup:
        warmup.allocate(4096).close()
    before = daemon.settled_fd_count()
    yield before
    with daemon.connect() as after, after.allocate(4096):
        pass
    assert daemon.wait_for_fd_count(before) == before, "no fd leaked"
    with daemon.connect() as observer:
        assert observer.stats().total_buffers == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("size", "offset", "length"),
    [(1, 0, 0), (4097, 0, 0), (3 << 20, 1, 1), (3 << 20, 4095, (2 << 20) + 3), ((3 << 20) + 5, 12345, 0)],
)
def test_loaded_bytes_equal_the_file(  # noqa: PLR0917 - pytest passes parameters positionally
    client: dmabufd_client.Client, tmp_path: Path, method: str, size: int, offset: int, length: int
) -> None:
    data = make_file(tmp_path / "data.bin", size)
    with client.load_file(
        tmp_path / "data.bin", offset=offset, length=length, method=method, max_buffer_bytes="1M", verify=True
    ) as loaded:
        expected = data[offset : offset + (length or size - offset)]
        assert loaded_bytes(loaded) == expected
        assert loaded.method == method
        assert loaded.stats.verified
        assert loaded.stats.bytes == len(expected)
        assert all(buffer.size <= 1 << 20 for buffer in loaded.buffers), "split at max_buffer_bytes"
        assert sum(s.length for s in loaded.segments) == len(expected)
        for segment in loaded.segments:
            assert segment.buffer_offset == segment.file_offset % 4096, "offsets congruent for direct I/O"


def test_one_gib_with_auto(client: dmabufd_client.Client, tmp_path: Path) -> None:
    data = make_file(tmp_path / "big.bin", 1 << 30)
    with client.load_file(tmp_path / "big.bin", verify=True, max_buffer_bytes="256M") as loaded:
        assert loaded.stats.verified
        assert loaded.method == "direct-read", "auto picks O_DIRECT into the memfd on a stock kernel"
        assert len(loaded.buffers) == 4
        assert loaded.stats.wall_seconds > 0
        assert loaded.stats.cpu_seconds > 0
        assert loaded.stats.parallelism == LoadingConfig().profile("memfd").parallelism
        first = loaded.segments[0]
        with loaded.buffer_of(first).map(Access.READ) as mapping:
            assert bytes(mapping.memoryview[:64]) == data[:64]
    del data


def test_progress_is_reported(client: dmabufd_client.Client, tmp_path: Path) -> None:
    make_file(tmp_path / "data.bin", 256 << 20)
    seen: list[tuple[int, int]] = []
    with client.load_file(tmp_path / "data.bin", method="buffered-read", progress=lambda d, t: seen.append((d, t))):
        pass
    assert seen[-1] == (256 << 20, 256 << 20)
    assert all(total == 256 << 20 for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_fd_source_reads_only_what_the_client_opened(client: dmabufd_client.Client, tmp_path: Path) -> None:
    data = make_file(tmp_path / "data.bin", 10000)
    fd = os.open(tmp_path / "data.bin", os.O_RDONLY)
    os.lseek(fd, 77, os.SEEK_SET)
    try:
        with client.load_file(fd, offset=5, length=100) as loaded:
            assert loaded_bytes(loaded) == data[5:105]
        assert os.lseek(fd, 0, os.SEEK_CUR) == 77, "the client's file position is untouched"
    finally:
        os.close(fd)


@pytest.mark.usefixtures("baseline")
class TestBadSources:
    def expect(self, status: grpc.StatusCode, call: object, match: str) -> None:
        assert callable(call)
        with pytest.raises(dmabufd_client.DmabufdError, match=match) as caught:
            call()
        assert caught.value.status is status

    def test_directory(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        fd = os.open(tmp_path, os.O_RDONLY)
        try:
            self.expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.load_file(fd), "a directory")
        finally:
            os.close(fd)

    def test_fifo(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        os.mkfifo(tmp_path / "fifo")
        fd = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        try:
            self.expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.load_file(fd), "a FIFO")
        finally:
            os.close(fd)

    def test_dev_zero(self, client: dmabufd_client.Client) -> None:
        self.expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.load_file("/dev/zero"), "a character device")

    def test_socket(self, client: dmabufd_client.Client) -> None:
        left, right = socket.socketpair()
        with left, right:
            self.expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.load_file(left.fileno()), "a socket")

    def test_write_only_fd(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        make_file(tmp_path / "data.bin", 100)
        fd = os.open(tmp_path / "data.bin", os.O_WRONLY)
        try:
            self.expect(grpc.StatusCode.PERMISSION_DENIED, lambda: client.load_file(fd), "writing only")
        finally:
            os.close(fd)

    def test_offset_past_the_end(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        make_file(tmp_path / "data.bin", 100)
        self.expect(
            grpc.StatusCode.OUT_OF_RANGE,
            lambda: client.load_file(tmp_path / "data.bin", offset=101),
            "past the end",
        )

    def test_length_past_the_end(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        make_file(tmp_path / "data.bin", 100)
        self.expect(
            grpc.StatusCode.OUT_OF_RANGE,
            lambda: client.load_file(tmp_path / "data.bin", offset=50, length=51),
            "run past the end",
        )

    def test_empty_file(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        make_file(tmp_path / "empty", 0)
        self.expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.load_file(tmp_path / "empty"), "empty")

    def test_path_loads_disabled_by_default(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        make_file(tmp_path / "data.bin", 100)
        self.expect(
            grpc.StatusCode.PERMISSION_DENIED,
            lambda: client.load_file(tmp_path / "data.bin", by_path=True),
            "loading.roots is empty",
        )

    def test_method_the_heap_cannot_do(self, client: dmabufd_client.Client, tmp_path: Path) -> None:
        make_file(tmp_path / "data.bin", 100)
        self.expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: client.load_file(tmp_path / "data.bin", method="direct-cfr"),
            "does not work into heap 'memfd'",
        )


def test_path_rules(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    data = make_file(models / "weights.bin", 5000)
    make_file(tmp_path / "secret.bin", 100)
    (models / "escape").symlink_to(tmp_path / "secret.bin")
    daemon = daemon_factory(f'[loading]\nroots = ["{models}"]\n')
    with daemon.connect() as client:
        with client.load_file(models / "weights.bin", by_path=True) as loaded:
            assert loaded_bytes(loaded) == data
        with pytest.raises(dmabufd_client.PermissionDenied, match="outside the directories"):
            client.load_file(tmp_path / "secret.bin", by_path=True)
        with pytest.raises(dmabufd_client.PermissionDenied, match="outside the directories"):
            client.load_file(models / "escape", by_path=True)
        with pytest.raises(dmabufd_client.NotFound):
            client.load_file(models / "missing.bin", by_path=True)
        os.mkfifo(models / "fifo")
        with pytest.raises(dmabufd_client.InvalidArgument, match="a FIFO"):
            client.load_file(models / "fifo", by_path=True)  # and the daemon did not block opening it


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid")
def test_path_is_opened_with_the_clients_credentials(daemon_factory: DaemonFactory) -> None:
    """The daemon (root) could read a 0600 root file; a client of uid 12345
    cannot, so loading it by path must fail for that client."""
    daemon = daemon_factory('[loading]\nroots = ["/tmp"]\n', public=True)
    models = daemon.runtime_dir.parent
    make_file(models / "public.bin", 4096)
    (models / "public.bin").chmod(0o644)
    make_file(models / "private.bin", 4096)
    (models / "private.bin").chmod(0o600)
    result = run_as_rootless_client(
        daemon,
        f"c.load_file({str(models / 'public.bin')!r}, by_path=True).close()\n"
        "try:\n"
        f"    c.load_file({str(models / 'private.bin')!r}, by_path=True)\n"
        "except dmabufd_client.PermissionDenied as e:\n"
        "    print('denied:', e)\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"denied: uid {ROOTLESS_UID} may not read")
    assert stat.S_IMODE(os.stat(models / "private.bin").st_mode) == 0o600


# For tests that act on a load's first progress report, which comes
# PROGRESS_INTERVAL_S (0.25 s, api/loading.py) after the load starts: one
# lane of 1 MiB chunks, and a file it takes about 0.6 s to load from the
# page cache (512 MiB took 0.3 s, too close to that report).
SLOW_LOAD_CONFIG = '[loading]\nparallelism = 1\nchunk_bytes = "1M"\n'
SLOW_LOAD_BYTES = 1 << 30


def test_truncated_while_loading(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory(SLOW_LOAD_CONFIG)
    make_file(tmp_path / "data.bin", SLOW_LOAD_BYTES)
    truncated = threading.Event()

    def truncate_midway(done: int, total: int) -> None:
        if 0 < done < total and not truncated.is_set():
            os.truncate(tmp_path / "data.bin", 4096)
            truncated.set()

    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.DmabufdError, match="truncated") as caught:
            client.load_file(tmp_path / "data.bin", method="buffered-read", progress=truncate_midway)
        assert caught.value.status is grpc.StatusCode.FAILED_PRECONDITION
        assert truncated.is_set()
        assert client.stats().total_buffers == 0
        client.allocate(4096).close()


def test_cancel_frees_everything(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory(SLOW_LOAD_CONFIG)
    make_file(tmp_path / "data.bin", SLOW_LOAD_BYTES)

    class Stop(Exception):
        pass

    def cancel_midway(done: int, total: int) -> None:
        if 0 < done < total:
            raise Stop

    with daemon.connect() as client:
        client.heaps()  # the gRPC connection opens at the first call
        baseline = daemon.settled_fd_count()
        with pytest.raises(Stop):
            client.load_file(tmp_path / "data.bin", method="buffered-read", progress=cancel_midway)
        assert daemon.wait_for_fd_count(baseline) == baseline
        assert client.stats().total_buffers == 0
        assert "cancelled" in daemon.log()


def test_quota_applies_to_loads(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory('[quota.default]\nmax_bytes = "1M"\n')
    make_file(tmp_path / "data.bin", 2 << 20)
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.ResourceExhausted):
            client.load_file(tmp_path / "data.bin")
        with client.load_file(tmp_path / "data.bin", length=1 << 19):
            pass
