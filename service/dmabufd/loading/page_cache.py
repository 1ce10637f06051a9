"""Which parts of a file the page cache holds already, asked of the kernel.

cachestat(2) (Linux 6.5) counts the cached pages of a file range without
touching them: no read, no mapping of the client's file (a mapping could
SIGBUS the daemon if the client truncated the file), no effect on the
cache. Where the kernel lacks it the answer is "unknown", and loads read
from the device as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import struct
import threading

log = logging.getLogger(__name__)

# include/uapi/asm-generic/unistd.h: the same number on x86-64 and arm64.
SYS_CACHESTAT = 451
# struct cachestat_range { __u64 off; __u64 len; }
CACHESTAT_RANGE = struct.Struct("=QQ")
# struct cachestat { __u64 nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted; }
CACHESTAT = struct.Struct("=QQQQQ")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Cachestat:
    """Whether the running kernel answers cachestat; the first ENOSYS (or a
    seccomp refusal) turns it off for good. Locking: _lock guards
    `supported`; the syscall runs outside it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.supported = platform.machine() in ("x86_64", "aarch64")

    def turn_off(self, error: int) -> None:
        with self._lock:
            if self.supported:
                log.info("cachestat unavailable (%s): loads read from the device", os.strerror(error))
            self.supported = False


_CACHESTAT = _Cachestat()


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """Pages of [offset, offset + length) of the file behind `fd` that are
    in the page cache, or None where the kernel cannot say."""
    if not _CACHESTAT.supported:
        return None
    request = ctypes.create_string_buffer(CACHESTAT_RANGE.pack(offset, length), CACHESTAT_RANGE.size)
    answer = ctypes.create_string_buffer(CACHESTAT.size)
    if _libc.syscall(SYS_CACHESTAT, fd, request, answer, 0) != 0:
        error = ctypes.get_errno()
        if error in (errno.ENOSYS, errno.EPERM):  # no cachestat, or a seccomp filter refuses it
            _CACHESTAT.turn_off(error)
        return None
    return int(CACHESTAT.unpack(answer.raw)[0])


def fully_cached(fd: int, offset: int, length: int) -> bool:
    """True when every page of the range is cached (unknown: False)."""
    first = offset // PAGE_SIZE
    pages = -(-(offset + length) // PAGE_SIZE) - first
    found = cached_pages(fd, offset, length)
    return found is not None and found >= pages
