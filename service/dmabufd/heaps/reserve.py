"""Memfds made before they are asked for, pages and all: the memfd reserve.

A fresh memfd gets its pages as a load writes them, under the memfd's
inode lock, so one lane at a time pays for each page; on a fast device that
allocation, not the I/O, sets the pace of a load into one memfd
(bench/README.md, "Prepared memory"). The reserve pays it earlier: its
thread makes memfds of the sizes `[heaps] memfd_reserve` names and
allocates their pages with fallocate, at idle priority, so only CPU time
nothing else wanted goes into them. An allocation from the memfd heap whose
size is from half of a prepared memfd's size up to all of it takes that
memfd instead of a fresh one, and the thread makes another, but not while
a load is moving bytes (held()): idle priority keeps it off a busy CPU, not
out of the page allocator or the memory bus a load is using. It prepares
in steps of PREPARE_STEP_BYTES and pauses between two when a load starts.

A prepared memfd has never left the daemon and nothing was ever written to
it: it reads as zeros, as a fresh memfd does. It goes out once, as one
buffer, and never comes back.

What it costs is memory held while idle (the sum of the sizes, the
daemon's own, charged to no client until a buffer takes it), and a name:
every prepared memfd is called PREPARED_NAME in /proc, since a memfd
cannot be renamed. That is why there is no reserve unless the
configuration asks for one.

Ownership: the reserve owns every fd in `_ready` and the one its thread is
preparing; take() hands one over, close() closes the rest.
Locking: `_cond` guards `_ready`, `_holds` and `_closed`. It is a leaf,
held for list operations and counters only, never across a syscall.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator

log = logging.getLogger(__name__)

PREPARED_NAME = "dmabufd:prepared"
# After a failed preparation (ENOMEM, a memory cgroup's limit), the thread
# waits this long before trying again: memory may have been freed by then,
# and a reserve the machine cannot afford must not spin.
RETRY_S = 30.0
# How long close() waits for a preparation under way (a step of fallocate
# may take a while on a slow machine; the fd is closed either way).
CLOSE_WAIT_S = 5.0
# Pages allocated at a time: a load that starts meanwhile waits for one
# step at most (about 20 ms here) before the thread pauses.
PREPARE_STEP_BYTES = 64 << 20


def fits(prepared: int, size: int) -> bool:
    """Whether a buffer of `size` bytes may take a prepared memfd of
    `prepared` bytes: no smaller (a memfd is truncated down, never grown),
    and at most twice as large, so no more than half its pages go to waste."""
    return size <= prepared <= 2 * size


def best_fit(prepared: list[int], size: int) -> int | None:
    """The index of the smallest of the `prepared` sizes that fits `size`."""
    candidates = [i for i, each in enumerate(prepared) if fits(each, size)]
    return min(candidates, key=lambda i: prepared[i]) if candidates else None


class MemfdReserve:
    """Prepared memfds of `sizes` (page multiples), one per entry."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self._wanted = Counter(sizes)
        self._cond = threading.Condition(threading.Lock())
        self._ready: list[tuple[int, int]] = []  # (size, fd), guarded by _cond
        self._holds = 0  # loads moving bytes now, guarded by _cond
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self._wanted.elements()))

    @property
    def ready_bytes(self) -> int:
        with self._cond:
            return sum(size for size, _ in self._ready)

    def start(self) -> None:
        """Start preparing (a no-op for an empty reserve)."""
        if not self._wanted or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="memfd-reserve", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """No preparing while the block runs (a load moving its bytes)."""
        with self._cond:
            self._holds += 1
        try:
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify()

    def take(self, size: int, seals: int) -> int | None:
        """A prepared memfd that fits `size` (fits()), truncated to `size`
        and sealed with `seals`; the caller owns the fd. None: none fits."""
        with self._cond:
            index = best_fit([prepared for prepared, _ in self._ready], size)
            if index is None:
                return None
            prepared, fd = self._ready.pop(index)
            self._cond.notify()
        try:
            if prepared != size:
                os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Stop preparing and close every prepared memfd."""
        with self._cond:
            self._closed = True
            ready, self._ready = self._ready, []
            self._cond.notify()
        for _, fd in ready:
            os.close(fd)
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S)

    # -- the reserve's thread

    def _missing(self) -> int | None:
        """The size of one prepared memfd the reserve lacks (under _cond)."""
        have = Counter(size for size, _ in self._ready)
        lacking = self._wanted - have
        return max(lacking) if lacking else None

    def _run(self) -> None:
        _run_when_idle()
        failing = False
        while True:
            with self._cond:
                size = self._missing()
                while not self._closed and size is None:
                    self._cond.wait()
                    size = self._missing()
                if self._closed or size is None:
                    return
            try:
                fd = self._prepare(size)
            except _Closed:
                return
            except OSError as error:
                if not failing:
                    log.warning(
                        "memfd reserve: cannot prepare %d bytes (%s); trying again every %.0f s",
                        size,
                        os.strerror(error.errno or 0),
                        RETRY_S,
                    )
                failing = True
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, RETRY_S)
                continue
            if failing:
                log.info("memfd reserve: preparing again")
                failing = False
            with self._cond:
                if not self._closed:
                    self._ready.append((size, fd))
                    continue
            os.close(fd)
            return

    def _prepare(self, size: int) -> int:
        """A memfd of `size` bytes whose pages are allocated (fallocate,
        which allocates without writing them: they still read as zeros),
        a step at a time, each once no load is moving bytes."""
        fd = new_memfd(size)
        try:
            for offset in range(0, size, PREPARE_STEP_BYTES):
                with self._cond:
                    while self._holds and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        raise _Closed
                allocate_pages(fd, offset, min(PREPARE_STEP_BYTES, size - offset))
        except BaseException:
            os.close(fd)
            raise
        return fd


class _Closed(Exception):
    """The reserve closed while its thread was preparing."""


def new_memfd(size: int) -> int:
    fd = os.memfd_create(PREPARED_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def allocate_pages(fd: int, offset: int, length: int) -> None:
    os.posix_fallocate(fd, offset, length)


def _run_when_idle() -> None:
    """Put the calling thread in SCHED_IDLE (on Linux the policy is per
    thread): it runs only when no other thread wants the CPU. Where that is
    refused (a seccomp filter), nice 19 is nearly as good."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        except OSError as error:
            log.warning("memfd reserve: runs at the daemon's priority (%s)", os.strerror(error.errno or 0))
