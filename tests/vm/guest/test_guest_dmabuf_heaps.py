"""Mirror of the upstream dmabuf-heaps selftest (tools/testing/selftests/dmabuf-heaps) in Python,
against the real /dev/dma_heap/system of the VM's kernel."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.vm.guest.dmabufd_vm_uapi import (
    DMA_BUF_SET_NAME_A,
    DMA_BUF_SET_NAME_B,
    DMA_BUF_SYNC_READ,
    DMA_BUF_SYNC_RW,
    DMA_BUF_SYNC_WRITE,
    HEAP_DIR,
    SYSTEM_HEAP,
    alloc_system,
    buf_size,
    cpu_access,
    expect_errno,
    fdinfo,
    heap_alloc,
    map_buf,
    open_heap,
    set_name,
)

ONE_MEG = 1 << 20


def test_system_heap_present() -> None:
    assert SYSTEM_HEAP.exists(), f"heaps present: {sorted(p.name for p in HEAP_DIR.iterdir())}"
    assert Path("/sys/class/dma_heap/system").exists()


def test_alloc_mmap_sync_write_read() -> None:
    fd = alloc_system(ONE_MEG)
    try:
        assert buf_size(fd) == ONE_MEG
        with map_buf(fd, ONE_MEG) as mm:
            pattern = bytes(range(256)) * (ONE_MEG // 256)
            with cpu_access(fd, DMA_BUF_SYNC_WRITE):
                mm[:] = pattern
            with cpu_access(fd, DMA_BUF_SYNC_READ):
                assert mm[:] == pattern
            with cpu_access(fd, DMA_BUF_SYNC_RW):
                mm[100:104] = b"dmab"
                assert mm[96:108] == pattern[96:100] + b"dmab" + pattern[104:108]
    finally:
        os.close(fd)


def test_len_rounded_up_to_page() -> None:
    fd = alloc_system(5000)
    try:
        assert buf_size(fd) == 8192
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [4096, ONE_MEG], ids=["4K", "1M"])
def test_buffers_zeroed_after_reuse(size: int) -> None:
    # Allocate and dirty 32 buffers, free them, allocate 32 again: all must come back zeroed.
    with open_heap() as hfd:
        for _ in range(32):
            fd = heap_alloc(hfd, size)
            with map_buf(fd, size) as mm, cpu_access(fd, DMA_BUF_SYNC_WRITE):
                mm[:] = b"\xff" * size
            os.close(fd)
        zero = bytes(size)
        for i in range(32):
            fd = heap_alloc(hfd, size)
            try:
                with map_buf(fd, size, write=False) as mm, cpu_access(fd, DMA_BUF_SYNC_READ):
                    assert mm[:] == zero, f"buffer {i} of {size} bytes not zeroed"
            finally:
                os.close(fd)


@pytest.mark.parametrize("struct_size", [16, 48], ids=["older-16", "newer-48"])
def test_alloc_struct_size_compat(struct_size: int) -> None:
    # Same ioctl nr with a smaller (no heap_flags) or bigger (trailing garbage) struct encoded
    # in its size field: both accepted by dma_heap_ioctl's copy-in/zero-fill.
    with open_heap() as hfd:
        fd = heap_alloc(hfd, ONE_MEG, struct_size=struct_size)
        try:
            assert buf_size(fd) == ONE_MEG
            assert fdinfo(fd)["exp_name"] == "system"
        finally:
            os.close(fd)


def test_alloc_on_bad_fds() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with expect_errno(errno.EBADF):
        heap_alloc(r, ONE_MEG)  # closed fd
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        with expect_errno(errno.ENOTTY):
            heap_alloc(null, ONE_MEG)  # not a heap
    finally:
        os.close(null)


@pytest.mark.parametrize(
    ("kwargs", "length"),
    [
        ({"heap_flags": 0x111111}, ONE_MEG),
        ({"heap_flags": 1}, ONE_MEG),
        ({"fd_flags": ~(os.O_RDWR | os.O_CLOEXEC) & 0xFFFFFFFF}, ONE_MEG),
        ({"fd_flags": os.O_RDWR | os.O_NONBLOCK}, ONE_MEG),
        ({"fd_in": 5}, ONE_MEG),
        ({}, 0),
    ],
    ids=["heap_flags-0x111111", "heap_flags-1", "fd_flags-inverse", "fd_flags-nonblock", "fd-nonzero", "len-0"],
)
def test_alloc_rejects_bad_arguments(kwargs: dict[str, int], length: int) -> None:
    with open_heap() as hfd, expect_errno(errno.EINVAL):
        heap_alloc(hfd, length, **kwargs)


def test_fdinfo_exporter_and_size() -> None:
    fd = alloc_system(2 * ONE_MEG)
    try:
        info = fdinfo(fd)
        assert info["exp_name"] == "system"
        assert int(info["size"]) == 2 * ONE_MEG
        assert int(info["count"]) >= 1
    finally:
        os.close(fd)


@pytest.mark.parametrize("request_code", [DMA_BUF_SET_NAME_A, DMA_BUF_SET_NAME_B], ids=["A", "B"])
def test_set_name_visible(request_code: int) -> None:
    fd = alloc_system(ONE_MEG)
    try:
        name = "dmabufd-test-name"
        set_name(fd, name, request_code)
        assert fdinfo(fd)["name"] == name
        max_name = "n" * 31
        set_name(fd, max_name, request_code)
        assert fdinfo(fd)["name"] == max_name
        with expect_errno(errno.EINVAL):
            set_name(fd, "x" * 32, request_code)
        assert fdinfo(fd)["name"] == max_name
    finally:
        os.close(fd)


def test_name_in_maps_debugfs_and_sysfs_stats() -> None:
    fd = alloc_system(ONE_MEG)
    try:
        set_name(fd, "dmabufd-acct")
        ino = os.fstat(fd).st_ino
        with map_buf(fd, ONE_MEG, write=False):
            maps = Path("/proc/self/maps").read_text()
            assert "/dmabuf:dmabufd-acct" in maps
        bufinfo = Path("/sys/kernel/debug/dma_buf/bufinfo")
        assert bufinfo.exists(), "debugfs not mounted or CONFIG_DEBUG_FS missing"
        text = bufinfo.read_text()
        # "size flags mode count exp_name ino name", ino as %08lu
        lines = [ln for ln in text.splitlines() if ln.endswith("\tdmabufd-acct")]
        assert len(lines) == 1, text[:2000]
        fields = lines[0].split("\t")
        assert int(fields[0]) == ONE_MEG
        assert fields[4] == "system"
        assert int(fields[5]) == ino
        assert "Total" in text.splitlines()[-1]
        stats = Path(f"/sys/kernel/dmabuf/buffers/{ino}")
        assert (stats / "exporter_name").read_text().strip() == "system"
        assert int((stats / "size").read_text()) == ONE_MEG
    finally:
        os.close(fd)


def test_write_mmap_needs_writable_fd() -> None:
    with open_heap() as hfd:
        fd = heap_alloc(hfd, ONE_MEG, fd_flags=os.O_RDONLY | os.O_CLOEXEC)
        try:
            with expect_errno(errno.EACCES):
                map_buf(fd, ONE_MEG, write=True)
            with map_buf(fd, ONE_MEG, write=False) as mm:
                assert mm[:16] == bytes(16)
        finally:
            os.close(fd)
