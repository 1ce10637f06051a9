"""dmabufd on the product's kernel: real DMA heaps and udmabuf, through
gRPC, with fds passed between real processes. Runs inside the VM only."""

from __future__ import annotations

import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dmabufd_client
from dmabufd_client import Access, Backend
from tests.conftest import RunningDaemon

PEER = Path(__file__).resolve().parents[2] / "integration" / "peer.py"
SIZE_LIMIT = Path("/sys/module/udmabuf/parameters/size_limit_mb")


def fdinfo(pid: int, fd: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def field(info: dict[str, str], key: str) -> str:
    return info.get(key, "").strip()


def test_real_heaps_are_discovered(daemon: RunningDaemon) -> None:
    assert Path("/dev/dma_heap/system").exists(), "the product kernel must have the system heap"
    with daemon.connect() as client:
        heaps = {heap.name: heap for heap in client.heaps()}
    system = heaps["system"]
    assert system.backend is Backend.DMA_HEAP
    assert system.device_importable
    assert system.cpu_sync_required
    assert system.device_path == "/dev/dma_heap/system"
    udmabuf = heaps["udmabuf"]
    assert udmabuf.backend is Backend.UDMABUF
    assert udmabuf.max_buffer_bytes == int(SIZE_LIMIT.read_text()) << 20
    assert heaps["memfd"].backend is Backend.MEMFD
    assert "discovery: udev" in daemon.log(), "pyudev enumerates the dma_heap subsystem in the VM"


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
def test_bytes_written_by_one_process_are_read_by_another(daemon: RunningDaemon, tmp_path: Path, heap: str) -> None:
    rendezvous = str(tmp_path / "peer.sock")
    size = 4 << 20
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(rendezvous)
        listener.listen(1)
        writer = subprocess.Popen(
            [sys.executable, str(PEER), "share", str(daemon.runtime_dir), rendezvous, str(size), "90", heap]
        )
        connection, _ = listener.accept()
        with connection:
            message, fds, _, _ = socket.recv_fds(connection, 4096, 1)
            (fd,) = fds
            info = fdinfo(os.getpid(), fd)  # while the writer still holds its copy
            connection.send(b"k")
        assert writer.wait(timeout=60) == 0
    try:
        assert field(info, "exp_name") == heap
        assert field(info, "name") == f"{writer.pid}:shared"
        assert int(field(info, "size")) == size
        assert json.loads(message)["kernel_name"] == f"{writer.pid}:shared"
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as region:
            assert region[:] == bytes([90]) * size
    finally:
        os.close(fd)


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
def test_names_in_fdinfo_of_client_and_daemon(daemon: RunningDaemon, heap: str) -> None:
    with daemon.connect() as client, client.allocate("1M", heap=heap, name="named") as buffer:
        mine = fdinfo(os.getpid(), buffer.fileno())
        assert field(mine, "exp_name") == heap
        assert field(mine, "name") == f"{os.getpid()}:named"
        daemon_names = []
        for fd in os.listdir(f"/proc/{daemon.pid}/fd"):
            try:
                daemon_names.append(field(fdinfo(daemon.pid, int(fd)), "name"))
            except OSError:
                continue
        assert f"{os.getpid()}:named" in daemon_names, "the daemon's own reference carries the same name"


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
def test_map_with_sync_roundtrip_and_zeroed_allocations(daemon: RunningDaemon, heap: str) -> None:
    with daemon.connect() as client:
        first = client.allocate_batch("1M", 8, heap=heap)
        for index, buffer in enumerate(first):
            assert buffer.is_dma_buf
            with buffer.map(Access.RW) as mapping:
                array = mapping.numpy()
                assert not array.any(), "fresh heap memory is zero-filled"
                array[:] = index + 1
                del array
            with buffer.map(Access.READ) as mapping:
                assert bytes(mapping.memoryview[:4]) == bytes([index + 1]) * 4
        for buffer in first:
            buffer.close()
        # Reused pages come back zeroed (the upstream selftest's check).
        for buffer in client.allocate_batch("1M", 8, heap=heap):
            with buffer.map(Access.READ) as mapping:
                view = mapping.memoryview
                assert view.tobytes() == bytes(len(view))
                del view
            buffer.close()


def test_udmabuf_size_limit_is_a_clear_error(daemon: RunningDaemon) -> None:
    limit = int(SIZE_LIMIT.read_text()) << 20
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.InvalidArgument, match="size_limit_mb"):
            client.allocate(limit + 4096, heap="udmabuf")
        client.allocate(limit, heap="udmabuf").close()


def test_usage_routes_on_real_heaps(daemon: RunningDaemon) -> None:
    with daemon.connect() as client:
        names = {heap.name for heap in client.heaps()}
        with client.allocate(4096, usage="model-weights") as weights:
            assert weights.info.heap == "system"
        cma = next((n for n in ("default_cma_region", "linux,cma", "reserved", "default-pool") if n in names), None)
        with client.allocate(4096, usage="camera") as frame:
            assert frame.info.heap == (cma or "system")


def test_sigkill_releases_heap_buffers(daemon: RunningDaemon) -> None:
    with daemon.connect() as warmup:
        warmup.allocate(4096, heap="system").close()
    baseline = daemon.settled_fd_count()
    holder = subprocess.Popen(
        [sys.executable, str(PEER), "hold", str(daemon.runtime_dir), "32", str(1 << 20)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    held = json.loads(holder.stdout.readline())
    with daemon.connect() as observer:
        stats = observer.stats(check_proc=True)
        (entry,) = [c for c in stats.clients if c.session_id == held["session"]]
        assert (entry.buffer_count, entry.proc_buffer_count) == (32, 32)
        # fdinfo's view, as dmabuf_dump counts it: 32 dma-bufs of 1 MiB.
        assert (entry.proc_dmabuf_count, entry.proc_dmabuf_bytes) == (32, 32 << 20)
        assert {h.heap for h in stats.heaps} == {"system"}
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert daemon.wait_for_fd_count(baseline) == baseline
    with daemon.connect() as observer:
        assert observer.stats().total_buffers == 0


def test_a_real_dma_heap_uevent_reaches_discovery(daemon: RunningDaemon) -> None:
    """Kernel uevent for the real heap device, through pyudev, wakes the
    daemon's discovery (a synthetic "change": the heap set stays the same)."""
    Path("/sys/class/dma_heap/system/uevent").write_text("change")
    deadline = time.monotonic() + 10
    while "uevent: change system (dma_heap)" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    with daemon.connect() as client:
        assert "system" in {heap.name for heap in client.heaps()}


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
def test_pools_and_grants_on_real_dma_bufs(daemon: RunningDaemon, heap: str) -> None:
    with daemon.connect() as producer, daemon.connect() as consumer:
        pool = producer.allocate_pool("NV12", 640, 480, 4, heap=heap, recycle=True)
        assert all(b.is_dma_buf and b.info.heap == heap for b in pool.buffers)
        with pool.frames[2][0].map(Access.WRITE) as mapping:
            mapping.memoryview[pool.planes[1].offset : pool.planes[1].offset + 3] = b"uv!"
        with pytest.raises(dmabufd_client.DmabufdError, match="cannot make it read-only") as refused:
            producer.grant(pool, read_only=True)
        assert refused.value.status is not None
        assert refused.value.status.name == "FAILED_PRECONDITION"
        with consumer.redeem(producer.grant(pool).token) as received:
            assert received.pool is not None
            frame = received.pool.frames[2][0]
            assert field(fdinfo(os.getpid(), frame.fileno()), "exp_name") == heap
            with frame.map(Access.READ) as mapping:
                offset = received.pool.planes[1].offset
                assert bytes(mapping.memoryview[offset : offset + 3]) == b"uv!"
        granted = {b.info.inode for b in pool.buffers}
        pool.close()
        # Frames that went to a grant receiver are never recycled (it may
        # keep a mapping /proc does not show once its fds are closed);
        # frames that stayed with their owner come back.
        with producer.allocate_pool("NV12", 640, 480, 4, heap=heap, recycle=True) as fresh:
            assert not fresh.recycled
            assert not {b.info.inode for b in fresh.buffers} & granted
            kept = {b.info.inode for b in fresh.buffers}
        with producer.allocate_pool("NV12", 640, 480, 4, heap=heap, recycle=True) as again:
            assert again.recycled
            assert {b.info.inode for b in again.buffers} == kept
