"""The backends on this machine's kernel. DMA heaps and udmabuf are
exercised for real inside the VM (tests/vm/guest)."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from dmabufd.heaps.backend import BackendKind, HeapSpec, round_to_page
from dmabufd.heaps.dmaheap import DmaHeapBackend
from dmabufd.heaps.memfd import MEMFD_SPEC, MemfdBackend
from dmabufd.heaps.udmabuf import UdmabufBackend, read_size_limit
from dmabufd_common import uapi


def test_memfd_backend_allocates_sealed_named_zeroed_memory() -> None:
    allocation = MemfdBackend(MEMFD_SPEC).allocate(round_to_page(10000), "42:unit")
    try:
        assert allocation.size == 12288
        assert os.fstat(allocation.fd).st_size == 12288
        assert os.readlink(f"/proc/self/fd/{allocation.fd}") == "/memfd:42:unit (deleted)"
        seals = fcntl.fcntl(allocation.fd, fcntl.F_GET_SEALS)
        assert seals == uapi.F_SEAL_SHRINK | uapi.F_SEAL_GROW, "not F_SEAL_SEAL: read-only sharing may add seals"
        assert not os.get_inheritable(allocation.fd)
        with mmap.mmap(allocation.fd, allocation.size) as region:
            assert region[:] == bytes(allocation.size)
        assert allocation.identity == (os.fstat(allocation.fd).st_dev, os.fstat(allocation.fd).st_ino)
    finally:
        allocation.close()
    assert allocation.fd == -1


def test_dma_heap_backend_on_a_node_that_is_not_a_heap() -> None:
    """ioctl on a non-heap fails with OSError (the broker maps it to
    UNAVAILABLE); nothing leaks and the device fd is cached once."""
    backend = DmaHeapBackend(HeapSpec("fake", BackendKind.DMA_HEAP, "/dev/null"))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(OSError, match="Inappropriate ioctl"):
            backend.allocate(4096, "1:x")
    assert len(os.listdir("/proc/self/fd")) == before + 1
    backend.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_udmabuf_backend_on_a_node_that_is_not_udmabuf() -> None:
    backend = UdmabufBackend(HeapSpec("udmabuf", BackendKind.UDMABUF, "/dev/null", 64 << 20))
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Inappropriate ioctl"):
        backend.allocate(4096, "1:x")
    backend.close()
    assert len(os.listdir("/proc/self/fd")) == before, "the memfd made for it was closed"


def test_udmabuf_size_limit_default_when_the_module_is_absent(tmp_path: object) -> None:
    from pathlib import Path

    assert read_size_limit(Path(str(tmp_path))) == 64 << 20
