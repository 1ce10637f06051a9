"""Mirror of the upstream udmabuf selftest (tools/testing/selftests/drivers/dma-buf/udmabuf.c)
in Python, against the real /dev/udmabuf of the VM's kernel."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

from tests.vm.guest.dmabufd_vm_uapi import (
    F_SEAL_GROW,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    PAGE,
    UDMABUF_DEV,
    UDMABUF_PARAMS,
    buf_size,
    expect_errno,
    fdinfo,
    map_buf,
    sealed_memfd,
    set_name,
    udmabuf_create,
    udmabuf_create_list,
    udmabuf_param,
    udmabuf_size_limit_at_least,
)

NUM_PAGES = 4
NUM_ENTRIES = 4
MEMFD_PAGES = 1024


@pytest.fixture
def dev() -> Iterator[int]:
    fd = os.open(UDMABUF_DEV, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def memfd4() -> Iterator[int]:
    fd = sealed_memfd(NUM_PAGES * PAGE)
    yield fd
    os.close(fd)


def _expect_errno(code: int, func: Callable[..., object], *args: object) -> None:
    with expect_errno(code):
        func(*args)


def test_device_and_params_present() -> None:
    assert UDMABUF_DEV.exists()
    assert udmabuf_param("size_limit_mb") == 64  # the 6.12 default
    assert udmabuf_param("list_limit") == 1024
    assert oct((UDMABUF_PARAMS / "size_limit_mb").stat().st_mode & 0o777) == "0o644"


def test_unaligned_offset_rejected(dev: int, memfd4: int) -> None:
    _expect_errno(errno.EINVAL, udmabuf_create, dev, memfd4, PAGE // 2, PAGE)


def test_size_not_page_multiple_rejected(dev: int, memfd4: int) -> None:
    _expect_errno(errno.EINVAL, udmabuf_create, dev, memfd4, 0, PAGE // 2)


def test_zero_size_rejected(dev: int, memfd4: int) -> None:
    _expect_errno(errno.EINVAL, udmabuf_create, dev, memfd4, 0, 0)


def test_non_memfd_rejected(dev: int) -> None:
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        _expect_errno(errno.EBADFD, udmabuf_create, dev, null, 0, NUM_PAGES * PAGE)
    finally:
        os.close(null)
    # A plain tmpfs file is shmem, but it carries only F_SEAL_SEAL (observed on 6.12): it fails
    # the seal check (no F_SEAL_SHRINK) with EINVAL rather than the non-shmem EBADFD.
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, NUM_PAGES * PAGE)
        _expect_errno(errno.EINVAL, udmabuf_create, dev, fd, 0, NUM_PAGES * PAGE)
    finally:
        os.close(fd)


def test_memfd_without_shrink_seal_rejected(dev: int) -> None:
    fd = sealed_memfd(NUM_PAGES * PAGE, seals=F_SEAL_GROW)
    try:
        _expect_errno(errno.EINVAL, udmabuf_create, dev, fd, 0, NUM_PAGES * PAGE)
    finally:
        os.close(fd)
    fd = os.memfd_create("no-sealing", os.MFD_CLOEXEC)  # implicitly F_SEAL_SEAL only
    try:
        os.ftruncate(fd, NUM_PAGES * PAGE)
        _expect_errno(errno.EINVAL, udmabuf_create, dev, fd, 0, NUM_PAGES * PAGE)
    finally:
        os.close(fd)


def test_memfd_with_write_seal_rejected(dev: int) -> None:
    fd = sealed_memfd(NUM_PAGES * PAGE, seals=F_SEAL_SHRINK | F_SEAL_WRITE)
    try:
        _expect_errno(errno.EINVAL, udmabuf_create, dev, fd, 0, NUM_PAGES * PAGE)
    finally:
        os.close(fd)


def test_range_past_memfd_end_rejected(dev: int, memfd4: int) -> None:
    with expect_errno(errno.EINVAL):
        udmabuf_create(dev, memfd4, 0, 2 * NUM_PAGES * PAGE)


def test_closed_memfd_rejected(dev: int) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    _expect_errno(errno.EBADFD, udmabuf_create, dev, r, 0, PAGE)


def test_valid_create_over_four_pages(dev: int, memfd4: int) -> None:
    size = NUM_PAGES * PAGE
    with map_buf(memfd4, size) as mem:
        for i in range(NUM_PAGES):
            mem[i * PAGE] = ord("a")
        buf = udmabuf_create(dev, memfd4, 0, size)
        try:
            assert buf_size(buf) == size
            info = fdinfo(buf)
            assert info["exp_name"] == "udmabuf"
            assert int(info["size"]) == size
            assert os.get_inheritable(buf) is False  # UDMABUF_FLAGS_CLOEXEC
            set_name(buf, "dmabufd-udmabuf")
            assert fdinfo(buf)["name"] == "dmabufd-udmabuf"
            with map_buf(buf, size) as ub:
                assert all(ub[i * PAGE] == ord("a") for i in range(NUM_PAGES))
                mem[PAGE + 7] = ord("z")  # writes through the memfd show in the udmabuf
                assert ub[PAGE + 7] == ord("z")
                ub[3 * PAGE + 1] = ord("q")  # and the other way round
                assert mem[3 * PAGE + 1] == ord("q")
        finally:
            os.close(buf)


def test_create_list_four_chunks_coherent(dev: int) -> None:
    size = MEMFD_PAGES * PAGE
    memfd = sealed_memfd(size)
    try:
        with map_buf(memfd, size) as mem:
            for i in range(MEMFD_PAGES):
                mem[i * PAGE] = ord("a")
            chunk_stride = size // NUM_ENTRIES
            items = [(memfd, i * chunk_stride, NUM_PAGES * PAGE) for i in range(NUM_ENTRIES)]
            buf = udmabuf_create_list(dev, items)
            try:
                total = NUM_ENTRIES * NUM_PAGES * PAGE
                assert buf_size(buf) == total
                with map_buf(buf, total) as ub:
                    for i in range(MEMFD_PAGES):  # write 'b' through the memfd after create
                        mem[i * PAGE] = ord("b")
                    k = 0
                    for i in range(NUM_ENTRIES):
                        for j in range(NUM_PAGES):
                            src = i * chunk_stride + j * PAGE
                            assert ub[k * PAGE] == mem[src] == ord("b"), (i, j)
                            k += 1
                    # page-level identity, not just equal letters
                    for i in range(NUM_ENTRIES):
                        mem[i * chunk_stride + 5 : i * chunk_stride + 9] = bytes([i]) * 4
                    for i in range(NUM_ENTRIES):
                        k = i * NUM_PAGES
                        assert ub[k * PAGE + 5 : k * PAGE + 9] == bytes([i]) * 4
            finally:
                os.close(buf)
    finally:
        os.close(memfd)


def test_list_over_limit_rejected(dev: int, memfd4: int) -> None:
    limit = udmabuf_param("list_limit")
    items = [(memfd4, 0, PAGE)] * (limit + 1)
    _expect_errno(errno.EINVAL, udmabuf_create_list, dev, items)


def test_size_limit_enforced_and_raisable(dev: int) -> None:
    limit_mb = udmabuf_param("size_limit_mb")
    size = (limit_mb + 1) << 20
    memfd = sealed_memfd(size)
    try:
        _expect_errno(errno.EINVAL, udmabuf_create, dev, memfd, 0, size)
        with udmabuf_size_limit_at_least(limit_mb + 1):
            buf = udmabuf_create(dev, memfd, 0, size)
            assert buf_size(buf) == size
            os.close(buf)
        assert udmabuf_param("size_limit_mb") == limit_mb
    finally:
        os.close(memfd)
