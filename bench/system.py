"""The machine-level pieces of the benchmark: page cache, CPU time, a process's RSS, pipes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
PIPE_MAX_SIZE = Path("/proc/sys/fs/pipe-max-size")


def errno_name(error: OSError) -> str:
    code = error.errno or 0
    return errno.errorcode.get(code, str(code))


def cpu_seconds() -> float:
    """This process's user + system CPU time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CacheDropper:
    """`echo 3 > /proc/sys/vm/drop_caches` (after sync) when permitted; otherwise
    posix_fadvise(DONTNEED) over the test file, and `how` says so and why."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.how = "drop_caches" if enabled else "fadvise DONTNEED on the file (--no-drop-caches)"

    def drop(self, fd: int) -> None:
        os.sync()
        if self.enabled:
            try:
                DROP_CACHES.write_text("3\n")
                return
            except OSError as error:
                self.enabled = False
                self.how = f"fadvise DONTNEED on the file (writing {DROP_CACHES} failed: {errno_name(error)})"
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


_READ_BYTES = 8 << 20


def read_through(path: Path) -> None:
    """Read the whole file with buffered reads, so the page cache holds all of it."""
    buffer = bytearray(_READ_BYTES)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_fraction(path: Path) -> float | None:
    """The share of the file's pages in the page cache (mincore over a mapping that is never
    touched), or None if it cannot be told: proof that cold is cold and warm is warm."""
    size = path.stat().st_size
    if size == 0:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # mincore needs the mapping's address, which Python's mmap does not give for a
        # read-only mapping (ctypes.from_buffer wants a writable one): libc's mmap it is.
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            return None
        try:
            pages = -(-size // mmap.PAGESIZE)
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                return None
            # Bit 0 of each byte says whether that page is resident.
            resident = sum(byte & 1 for byte in bytes(vector))
            return resident / pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def size_pipe(read_end: int, wanted: int) -> tuple[int, str | None]:
    """F_SETPIPE_SZ to `wanted` bytes; when refused, the largest the system allows
    (/proc/sys/fs/pipe-max-size). Returns the size set and, if it is not `wanted`, why."""
    try:
        return fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, wanted), None
    except OSError as error:
        refused = errno_name(error)
    try:
        limit = int(PIPE_MAX_SIZE.read_text().strip())
    except (OSError, ValueError):
        limit = 1 << 20
    size = fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, min(limit, wanted))
    return size, f"F_SETPIPE_SZ {wanted} refused ({refused}); pipe is {size} bytes (pipe-max-size {limit})"


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status (VmRSS, RssAnon, RssFile, RssShmem, VmHWM), in bytes."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                values[key] = int(parts[0]) * 1024
    return values


# The clock id of a process's CPU time, as glibc's clock_getcpuclockid()
# makes it: ~pid << 3 | CPUCLOCK_SCHED (2), the "whole process" variant.
_CPUCLOCK_SCHED = 2


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of a whole process, every thread's (exited ones included),
    read from its CPU-time clock in nanoseconds. /proc/<pid>/stat counts in
    ticks of 10 ms, more than the daemon spends on a small load, so a
    difference of two readings could be 0; it is the fallback where the
    clock cannot be read."""
    with contextlib.suppress(OSError):
        return time.clock_gettime((~pid << 3) | _CPUCLOCK_SCHED)
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


@dataclass
class RssSample:
    before: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    hwm_reset: bool = False
    hwm_after: int | None = None

    def growth(self, key: str = "VmRSS") -> int:
        return max(0, self.peak.get(key, 0) - self.before.get(key, 0))


class RssSampler:
    """Samples a process's RSS every `interval_s` in a thread (peak per field); also resets
    its VmHWM (`echo 5 > /proc/<pid>/clear_refs`) so VmHWM afterwards is the exact peak."""

    def __init__(self, pid: int, interval_s: float = 0.002) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.result = RssSample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _take(self) -> None:
        values = proc_status(self.pid)
        self.result.samples += 1
        for key in RSS_FIELDS:
            self.result.peak[key] = max(self.result.peak.get(key, 0), values.get(key, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def __enter__(self) -> RssSampler:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5\n")
            self.result.hwm_reset = True
        except OSError:
            pass
        values = proc_status(self.pid)
        self.result.before = {key: values.get(key, 0) for key in RSS_FIELDS}
        self.result.peak = dict(self.result.before)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
        if self.result.hwm_reset:
            self.result.hwm_after = proc_status(self.pid).get("VmHWM")
