"""Buffers end to end: real daemon, real clients, real fds."""

from __future__ import annotations

import array
import fcntl
import json
import mmap
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import dmabufd_client
from dmabufd_client import Access, Backend
from dmabufd_common import uapi
from tests.conftest import RunningDaemon

PEER = Path(__file__).with_name("peer.py")


def test_allocate_map_write_read(client: dmabufd_client.Client) -> None:
    with client.allocate("64K", name="roundtrip") as buffer:
        assert buffer.size == 65536
        assert buffer.info.backend is Backend.MEMFD
        with buffer.map(Access.WRITE) as mapping:
            view = mapping.memoryview
            view[:4] = b"dmab"
            view[-4:] = b"ufd!"
            del view
        with buffer.map(Access.READ) as mapping:
            data = mapping.numpy()
            assert bytes(data[:4]) == b"dmab"
            assert bytes(data[-4:]) == b"ufd!"
            assert not data[4:-4].any(), "a new buffer is zero-filled"
            del data


def test_bytes_written_by_one_process_are_read_by_another(daemon: RunningDaemon, tmp_path: Path) -> None:
    rendezvous = str(tmp_path / "peer.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(rendezvous)
        listener.listen(1)
        writer = subprocess.Popen(
            [sys.executable, str(PEER), "share", str(daemon.runtime_dir), rendezvous, str(1 << 20), "171"]
        )
        connection, _ = listener.accept()
        with connection:
            message, fds, _, _ = socket.recv_fds(connection, 4096, 1)
            connection.send(b"k")
        assert writer.wait(timeout=30) == 0
    meta = json.loads(message)
    assert meta["kernel_name"] == f"{writer.pid}:shared", "the kernel name says which client it was for"
    (fd,) = fds
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{writer.pid}:shared")
        with mmap.mmap(fd, meta["size"], prot=mmap.PROT_READ) as region:
            assert region[:] == bytes([171]) * meta["size"]
    finally:
        os.close(fd)


def test_batch_of_64_in_one_call(client: dmabufd_client.Client) -> None:
    buffers = client.allocate_batch("4K", 64, name="batch")
    try:
        assert len(buffers) == 64
        assert len({b.id for b in buffers}) == 64
        assert len({os.fstat(b.fileno()).st_ino for b in buffers}) == 64, "64 distinct files"
        for buffer in buffers:
            assert os.fstat(buffer.fileno()).st_ino == buffer.info.inode
        assert sorted(info.id for info in client.buffers()) == sorted(b.id for b in buffers)
    finally:
        for buffer in buffers:
            buffer.close()
    assert client.buffers() == []


def test_batch_larger_than_one_scm_rights_message(client: dmabufd_client.Client) -> None:
    """300 fds cross two SCM_RIGHTS messages (the kernel caps one at 253)."""
    buffers = client.allocate_batch(4096, 300)
    try:
        assert len({os.fstat(b.fileno()).st_ino for b in buffers}) == 300
    finally:
        for buffer in buffers:
            buffer.close()


def test_release_keeps_the_clients_fd_valid(client: dmabufd_client.Client) -> None:
    buffer = client.allocate(8192)
    with buffer.map() as mapping:
        mapping.memoryview[:3] = b"abc"
    assert client.release([buffer.id]) == 8192
    assert client.buffers() == []
    fd = buffer.detach()
    try:
        with mmap.mmap(fd, 8192) as region:
            assert region[:3] == b"abc", "the kernel keeps the memory while our fd lives"
    finally:
        os.close(fd)


def test_memfd_buffers_are_sealed(client: dmabufd_client.Client) -> None:
    with client.allocate(4096) as buffer:
        seals = fcntl.fcntl(buffer.fileno(), fcntl.F_GET_SEALS)
        assert seals & uapi.F_SEAL_SHRINK
        assert seals & uapi.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.ftruncate(buffer.fileno(), 0)


def test_sizes_round_up_to_pages(client: dmabufd_client.Client) -> None:
    with client.allocate(1) as buffer:
        assert buffer.size == mmap.PAGESIZE
        assert os.fstat(buffer.fileno()).st_size == mmap.PAGESIZE


def test_describe_and_list(client: dmabufd_client.Client) -> None:
    with client.allocate("12K", usage="cpu", name="described") as buffer:
        info = client.describe(buffer.id)
        assert info == buffer.info
        assert info.usage == "cpu"
        assert info.heap == "memfd"
        assert info.kernel_name == f"{os.getpid()}:described"


def test_stats_cross_check_with_proc(daemon: RunningDaemon, client: dmabufd_client.Client) -> None:
    buffers = client.allocate_batch("16K", 3)
    stats = client.stats(check_proc=True)
    (mine,) = [c for c in stats.clients if c.session_id == client.session_id]
    assert (mine.buffer_count, mine.bytes) == (3, 3 * 16384)
    assert mine.proc_checked
    assert (mine.proc_buffer_count, mine.proc_bytes) == (3, 3 * 16384)
    assert mine.pid == os.getpid()
    assert mine.proc_dmabuf_count == 0, "memfds are not dma-bufs: fdinfo has no exp_name for them"
    # A client that drops its fd without releasing shows up in the cross-check.
    os.close(buffers[0].detach())
    (mine,) = [c for c in client.stats(check_proc=True).clients if c.session_id == client.session_id]
    assert (mine.buffer_count, mine.proc_buffer_count) == (3, 2)
    for buffer in buffers[1:]:
        buffer.close()


def test_fd_passing_uses_scm_rights_cloexec(client: dmabufd_client.Client) -> None:
    with client.allocate(4096) as buffer:
        assert fcntl.fcntl(buffer.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_heaps_report_memfd_capabilities(client: dmabufd_client.Client) -> None:
    heaps = {heap.name: heap for heap in client.heaps()}
    memfd = heaps["memfd"]
    assert memfd.backend is Backend.MEMFD
    assert not memfd.device_importable
    assert not memfd.cpu_sync_required
    assert memfd.allowed
    assert client.usage_routes()["default"] == ("system", "udmabuf", "memfd")


def test_passed_fd_array_roundtrip_keeps_ids_matched(client: dmabufd_client.Client) -> None:
    """Each delivered fd is the buffer the response names (not just any fd)."""
    buffers = client.allocate_batch(4096, 5)
    for index, buffer in enumerate(buffers):
        with buffer.map() as mapping:
            mapping.memoryview[0] = index
    inodes = array.array("Q", [os.fstat(b.fileno()).st_ino for b in buffers])
    assert list(inodes) == [b.info.inode for b in buffers]
    for buffer in buffers:
        buffer.close()
