"""Memfds made before they are asked for, pages and all: the memfd reserve.

A fresh memfd gets its pages as a load writes them, under the memfd's
inode lock, so one lane at a time pays for each page; on a fast device that
allocation, not the I/O, sets the pace of a load into one memfd
(bench/README.md, "Prepared memory"). The reserve pays it earlier: its
thread makes memfds of the sizes `[heaps] memfd_reserve` names and
allocates their pages with fallocate, and a load's buffer (fits()) takes
one instead of a fresh memfd; the thread then makes another.

When the thread works. Between loads: it prepares in steps of
PREPARE_STEP_BYTES and, before each, waits while a load holds the reserve
(held(): from the take of its prepared memfds to its last byte), up to
HOLD_PAUSE_S, so a load that stalls (a file on a FUSE mount that never
answers) delays the reserve, not stops it. Only with memory to spare: a
memfd whose pages would leave less than SPARE_FRACTION of the machine's
memory available (MemAvailable, which counts reclaimable page cache) is
not started; the thread waits RETRY_S, as after a refused step (ENOMEM).
At the daemon's own nice, not at idle priority: a thread of this
interpreter starved while holding its lock would stall every other
thread, the event loop included.

What a load gets. A prepared memfd has never left the daemon and nothing
was ever written to it: it reads as zeros, as a fresh memfd does. It goes
out once, as one buffer, and never comes back. Only loads take them (a
load writes every byte it keeps), on their own threads (truncating frees
pages, which is not for the event loop).

What it costs: memory held while idle (the sum of the sizes, the daemon's
own, charged to no client until a load takes it), the CPU of preparing,
and a name: every prepared memfd is called PREPARED_NAME in /proc, since a
memfd cannot be renamed. That is why there is no reserve unless the
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
# Pages allocated at a time, and so what a load starting meanwhile may
# overlap with (about 20 ms of a CPU here).
PREPARE_STEP_BYTES = 64 << 20
# A hold pauses preparation for at most this long per step.
HOLD_PAUSE_S = 2.0
# A memfd is not started when less than this share of the machine's
# memory would be available once it is prepared.
SPARE_FRACTION = 1 / 8
# After a refused or postponed step, the thread waits this long: memory may
# have been freed by then, and a reserve the machine cannot afford must
# not spin.
RETRY_S = 30.0
# How long close() waits for a step under way (the fd is closed either way).
CLOSE_WAIT_S = 5.0


def fits(prepared: int, size: int) -> bool:
    """Whether a buffer of `size` bytes may take a prepared memfd of
    `prepared` bytes: no smaller (a memfd is truncated down, never grown),
    and at most twice as large, so no more than half of its preparation is
    thrown away."""
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
        """Preparation pauses while the block runs (a load moving bytes)."""
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
        and sealed with `seals`; the caller owns the fd. None: none fits.
        Blocks while the truncation frees pages: not for the event loop."""
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
        lacking = self._wanted - Counter(size for size, _ in self._ready)
        return max(lacking) if lacking else None

    def _run(self) -> None:
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
                        error.strerror or error,
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
        a step at a time, each once no load holds the reserve (or one has
        for HOLD_PAUSE_S); not started without the memory to spare."""
        if not can_spare(size):
            raise MemoryShort(f"less than {SPARE_FRACTION:.1%} of memory would be left available")
        fd = new_memfd(size)
        try:
            for offset in range(0, size, PREPARE_STEP_BYTES):
                with self._cond:
                    self._cond.wait_for(lambda: not self._holds or self._closed, HOLD_PAUSE_S)
                    if self._closed:
                        raise _Closed
                allocate_pages(fd, offset, min(PREPARE_STEP_BYTES, size - offset))
        except BaseException:
            os.close(fd)
            raise
        return fd


class _Closed(Exception):
    """The reserve closed while its thread was preparing."""


class MemoryShort(OSError):
    """The machine has no memory to spare for a prepared memfd."""


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


def can_spare(length: int, meminfo_path: str = "/proc/meminfo") -> bool:
    """Whether `length` more bytes of memory leave SPARE_FRACTION of it
    available (MemAvailable against MemTotal; unknown counts as yes)."""
    total = available = None
    try:
        with open(meminfo_path, "rb") as meminfo:
            for line in meminfo:
                key, _, rest = line.partition(b":")
                if key == b"MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == b"MemAvailable":
                    available = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return True
    if total is None or available is None:
        return True
    return available - length >= total * SPARE_FRACTION
