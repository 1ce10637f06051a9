"""Populating a memfd's pages (the load's populate lane) lets other threads run.

Python's mmap module holds the GIL across mmap() and madvise(), so a lane
populating through it stopped the event loop and the I/O lanes for as long
as the kernel allocated and zeroed pages (tens of milliseconds per window
on this VM, where fresh memory costs a host fault).
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import threading
import time

import pytest

from dmabufd_common import uapi

SIZE = 512 << 20


def _fresh_memfd(size: int) -> int:
    fd = os.memfd_create("populate-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def test_populate_allocates_every_page() -> None:
    fd = _fresh_memfd(8 << 20)
    try:
        uapi.populate_shared(fd, 2 << 20, 4 << 20, huge_pages=False)
        # st_blocks counts 512-byte units of allocated shmem pages.
        assert os.fstat(fd).st_blocks * 512 == 4 << 20
        with mmap.mmap(fd, 8 << 20) as view:
            assert view[2 << 20 : 6 << 20] == bytes(4 << 20)
    finally:
        os.close(fd)


def test_populate_reports_the_kernels_refusal() -> None:
    fd = _fresh_memfd(8 << 20)
    try:
        # Past the end of the file: the mapping exists, its pages cannot.
        with pytest.raises(OSError, match="MADV_POPULATE_WRITE") as refused:
            uapi.populate_shared(fd, 16 << 20, 4 << 20, huge_pages=True)
        assert refused.value.errno == errno.EFAULT
    finally:
        os.close(fd)


def test_other_threads_run_while_pages_are_populated() -> None:
    fd = _fresh_memfd(SIZE)
    span: list[float] = []

    def populate() -> None:
        span.append(time.perf_counter())
        uapi.populate_shared(fd, 0, SIZE, huge_pages=True)
        span.append(time.perf_counter())

    wakeups: list[float] = []
    worker = threading.Thread(target=populate)
    try:
        worker.start()
        while worker.is_alive():
            # Each return from sleep needs the GIL back.
            time.sleep(0.001)
            wakeups.append(time.perf_counter())
        worker.join()
    finally:
        os.close(fd)
    began, ended = span
    took = ended - began
    marks = [began, *(t for t in wakeups if began < t < ended), ended]
    longest = max(b - a for a, b in itertools.pairwise(marks))
    # Long enough to tell: a thread holding the GIL would leave a gap as
    # long as the kernel's work, most of the call.
    assert took > 0.02, f"populating {SIZE >> 20} MiB took only {took:.4f} s: too quick to tell"
    assert longest < took / 3, (
        f"the main thread did not wake for {longest:.3f} s of the {took:.3f} s the kernel populated: "
        "the GIL is held across the call"
    )
