"""The memfd reserve (heaps/reserve.py): which allocations take a prepared
memfd, what they get, and that the reserve's thread refills it, survives
failures, runs at idle priority and leaves no fd behind."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dmabufd.heaps import reserve as reserve_module
from dmabufd.heaps.backend import BackendKind, HeapSpec
from dmabufd.heaps.memfd import MEMFD_SEALS, MemfdBackend
from dmabufd.heaps.reserve import MemfdReserve, best_fit, fits

MIB = 1 << 20


def own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s")
        time.sleep(0.01)


@pytest.fixture
def started() -> Iterator[Callable[[tuple[int, ...]], MemfdReserve]]:
    made: list[MemfdReserve] = []

    def start(sizes: tuple[int, ...]) -> MemfdReserve:
        reserve = MemfdReserve(sizes)
        made.append(reserve)
        reserve.start()
        wait_for(lambda: reserve.ready_bytes == sum(sizes))
        return reserve

    yield start
    for reserve in made:
        reserve.close()


def test_a_prepared_memfd_serves_sizes_from_half_of_it_to_all_of_it() -> None:
    assert fits(8 * MIB, 8 * MIB)
    assert fits(8 * MIB, 4 * MIB)
    assert not fits(8 * MIB, 4 * MIB - 4096)  # more than half would go to waste
    assert not fits(8 * MIB, 8 * MIB + 4096)  # a memfd is not grown
    assert best_fit([32 * MIB, 16 * MIB, 24 * MIB], 12 * MIB) == 1
    assert best_fit([32 * MIB, 16 * MIB], 20 * MIB) == 0
    assert best_fit([32 * MIB], 4 * MIB) is None
    assert best_fit([], 4 * MIB) is None


def test_a_taken_memfd_is_sealed_at_its_exact_size_reads_zeros_and_is_the_callers(
    started: Callable[[tuple[int, ...]], MemfdReserve],
) -> None:
    reserve = started((8 * MIB,))
    size = 6 * MIB
    fd = reserve.take(size, MEMFD_SEALS)
    assert fd is not None
    try:
        info = os.fstat(fd)
        assert info.st_size == size
        # Its pages were allocated beforehand, and the truncation freed the rest.
        assert info.st_blocks * 512 == size
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & MEMFD_SEALS == MEMFD_SEALS
        for offset in (0, size // 2, size - 4096):
            assert os.pread(fd, 4096, offset) == bytes(4096)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, size * 2)  # F_SEAL_GROW
        assert os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{reserve_module.PREPARED_NAME}")
    finally:
        os.close(fd)


def test_what_does_not_fit_gets_nothing_and_costs_the_reserve_nothing(
    started: Callable[[tuple[int, ...]], MemfdReserve],
) -> None:
    reserve = started((8 * MIB,))
    assert reserve.take(4 * MIB - 4096, MEMFD_SEALS) is None
    assert reserve.take(8 * MIB + 4096, MEMFD_SEALS) is None
    assert reserve.ready_bytes == 8 * MIB


def test_the_thread_prepares_another_once_one_is_taken(started: Callable[[tuple[int, ...]], MemfdReserve]) -> None:
    reserve = started((4 * MIB, 4 * MIB, 16 * MIB))
    taken = [reserve.take(4 * MIB, MEMFD_SEALS) for _ in range(3)]
    try:
        assert all(fd is not None for fd in taken[:2])
        # The third: both 4 MiB ones are gone, unless the thread was quick
        # enough to make one again; either way the reserve fills up again.
        wait_for(lambda: reserve.ready_bytes == 24 * MIB)
        assert sorted(reserve.sizes) == [4 * MIB, 4 * MIB, 16 * MIB]
    finally:
        for fd in taken:
            if fd is not None:
                os.close(fd)


def test_close_leaves_no_fd_and_ends_the_thread() -> None:
    before = own_fds()
    reserve = MemfdReserve((4 * MIB, 8 * MIB))
    reserve.start()
    wait_for(lambda: reserve.ready_bytes == 12 * MIB)
    assert len(own_fds() - before) == 2
    reserve.close()
    assert own_fds() == before
    assert not any(thread.name == "memfd-reserve" for thread in threading.enumerate())
    assert reserve.take(4 * MIB, MEMFD_SEALS) is None


def test_the_thread_runs_only_when_the_cpu_is_idle(started: Callable[[tuple[int, ...]], MemfdReserve]) -> None:
    started((4 * MIB,))
    (thread,) = [thread for thread in threading.enumerate() if thread.name == "memfd-reserve"]
    assert thread.native_id is not None
    assert os.sched_getscheduler(thread.native_id) == os.SCHED_IDLE


def test_a_reserve_the_machine_cannot_afford_waits_and_stays_closable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[int] = []

    def refuse(fd: int, offset: int, length: int) -> None:
        attempts.append(length)
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(reserve_module, "allocate_pages", refuse)
    before = own_fds()
    reserve = MemfdReserve((4 * MIB,))
    with caplog.at_level(logging.WARNING, logger=reserve_module.__name__):
        reserve.start()
        wait_for(lambda: bool(attempts))
        time.sleep(0.2)
        # One attempt, then a wait of RETRY_S: no spinning on a refusal.
        assert attempts == [4 * MIB]
        assert reserve.ready_bytes == 0
        assert reserve.take(4 * MIB, MEMFD_SEALS) is None
        began = time.monotonic()
        reserve.close()
    assert time.monotonic() - began < 2.0
    assert own_fds() == before
    assert [r.message for r in caplog.records if "cannot prepare" in r.message]


def test_nothing_is_prepared_while_a_load_moves_bytes(
    started: Callable[[tuple[int, ...]], MemfdReserve], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reserve_module, "PREPARE_STEP_BYTES", MIB)
    steps: list[float] = []
    real = reserve_module.allocate_pages

    def slowly(fd: int, offset: int, length: int) -> None:
        steps.append(time.monotonic())
        time.sleep(0.05)
        real(fd, offset, length)

    reserve = started((8 * MIB,))
    monkeypatch.setattr(reserve_module, "allocate_pages", slowly)
    with reserve.held():
        fd = reserve.take(8 * MIB, MEMFD_SEALS)
        assert fd is not None
        os.close(fd)
        time.sleep(0.2)
        assert steps == []  # held from the start: not one step
    wait_for(lambda: len(steps) >= 2)
    with reserve.held():
        # Held mid-way: the step under way ends, and no other starts.
        time.sleep(0.05)
        paused_at = len(steps)
        time.sleep(0.2)
        assert len(steps) == paused_at
        assert reserve.ready_bytes == 0
    wait_for(lambda: reserve.ready_bytes == 8 * MIB)
    assert len(steps) == 8


def test_the_memfd_heap_takes_a_prepared_memfd_when_one_fits(
    started: Callable[[tuple[int, ...]], MemfdReserve],
) -> None:
    backend = MemfdBackend(HeapSpec("memfd", BackendKind.MEMFD, ""), started((8 * MIB,)))
    prepared = backend.allocate(8 * MIB, "test:prepared")
    fresh = backend.allocate(MIB, "test:fresh")
    try:
        assert prepared.prepared
        assert prepared.size == 8 * MIB
        assert not fresh.prepared
        assert os.readlink(f"/proc/self/fd/{fresh.fd}").startswith("/memfd:test:fresh")
        for allocation in (prepared, fresh):
            assert fcntl.fcntl(allocation.fd, fcntl.F_GET_SEALS) == MEMFD_SEALS
    finally:
        prepared.close()
        fresh.close()


def test_an_empty_reserve_starts_no_thread() -> None:
    reserve = MemfdReserve(())
    reserve.start()
    assert not any(thread.name == "memfd-reserve" for thread in threading.enumerate())
    assert reserve.take(4096, MEMFD_SEALS) is None
    reserve.close()
