"""The rich error model on a real heap: a quota denial and a heap out of
memory reach the client as different exception types, each with its
ErrorInfo reason. The product kernel's CMA heap (CONFIG_CMA_SIZE_MBYTES=64)
fails an allocation larger than its free region with ENOMEM (cma_alloc
returns no pages; no OOM killer is involved), which no heap on a host
without DMA heaps can be made to do. Runs inside the VM only."""

from __future__ import annotations

import errno
import os

import pytest

import dmabufd_client
from dmabufd_client.errors import HeapOutOfMemory, QuotaExceeded
from dmabufd_common.reasons import Reason
from tests.conftest import DaemonFactory

CMA_NAMES = ("default_cma_region", "linux,cma", "reserved", "default-pool")
MIB = 1 << 20


def test_quota_denial_and_cma_out_of_memory_are_different_types(daemon_factory: DaemonFactory) -> None:
    # 48 MiB held of the 64 MiB region; the quota (80 MiB) refuses a second
    # 48 MiB before the heap is asked, and lets 24 MiB through to the
    # kernel, which has at most 16 MiB of the region left.
    daemon = daemon_factory('[quota.default]\nmax_bytes = "80M"\n')
    with daemon.connect() as client:
        names = {heap.name for heap in client.heaps()}
        cma = next((name for name in CMA_NAMES if name in names), None)
        assert cma is not None, f"the product kernel must have a CMA heap; heaps: {sorted(names)}"
        with client.allocate(48 * MIB, heap=cma):
            with pytest.raises(QuotaExceeded) as quota:
                client.allocate(48 * MIB, heap=cma)
            with pytest.raises(HeapOutOfMemory) as memory:
                client.allocate(24 * MIB, heap=cma)
        client.allocate(24 * MIB, heap=cma).close()  # the region is free again
    assert quota.value.reason == Reason.QUOTA_EXCEEDED
    assert quota.value.quota_violations[0][0] == f"uid:{os.getuid()}"
    assert memory.value.reason == Reason.HEAP_OUT_OF_MEMORY
    assert f"out of memory ({os.strerror(errno.ENOMEM)})" in memory.value.message, "the kernel's own ENOMEM"
    assert memory.value.quota_violations == ()
    assert not isinstance(quota.value, HeapOutOfMemory)
    assert not isinstance(memory.value, QuotaExceeded)
    for error in (quota.value, memory.value):
        assert isinstance(error, dmabufd_client.ResourceExhausted), "both are still RESOURCE_EXHAUSTED"
