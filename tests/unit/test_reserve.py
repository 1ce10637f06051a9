"""The memfd reserve (heaps/reserve.py): which allocations take a prepared
memfd, what they get, and that the reserve's thread refills it between
loads, survives failures and a lack of memory, and leaves no fd behind."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dmabufd.config import LoadingConfig
from dmabufd.heaps import reserve as reserve_module
from dmabufd.heaps.backend import BackendKind, HeapSpec
from dmabufd.heaps.memfd import MEMFD_SEALS, MemfdBackend
from dmabufd.heaps.reserve import MemfdReserve, best_fit, fits
from dmabufd.loading import loader as loader_module
from dmabufd.loading.loader import FileLoader, LoadRequest
from dmabufd.loading.method import Method
from dmabufd.loading.transfer import Moved

MIB = 1 << 20
REAL_CAN_SPARE = reserve_module.can_spare


def own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s")
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def ample_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reserve's tests do not depend on this machine's free memory
    (the tests of can_spare itself read files of their own)."""
    monkeypatch.setattr(reserve_module, "can_spare", lambda length: True)


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


def _refused(attempts: list[int]) -> Callable[[int, int, int], None]:
    def refuse(fd: int, offset: int, length: int) -> None:
        attempts.append(length)
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    return refuse


def _short(attempts: list[int]) -> Callable[[int], bool]:
    def short(length: int) -> bool:
        attempts.append(length)
        return False

    return short


@pytest.mark.parametrize(
    ("where", "stand_in", "logged"),
    [
        ("allocate_pages", _refused, "Cannot allocate memory"),  # the kernel refuses (ENOMEM)
        ("can_spare", _short, "of memory would be left available"),  # the machine is short
    ],
)
def test_a_reserve_the_machine_cannot_afford_waits_and_stays_closable(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
    stand_in: Callable[[list[int]], Callable[..., object]],
    logged: str,
) -> None:
    attempts: list[int] = []
    monkeypatch.setattr(reserve_module, where, stand_in(attempts))
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
    assert [r.message for r in caplog.records if logged in r.message]


def test_nothing_is_prepared_while_a_load_moves_bytes(
    started: Callable[[tuple[int, ...]], MemfdReserve], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reserve_module, "PREPARE_STEP_BYTES", MIB)
    steps: list[int] = []
    in_second_step, finish_it = threading.Event(), threading.Event()
    real = reserve_module.allocate_pages

    def recorded(fd: int, offset: int, length: int) -> None:
        steps.append(offset)
        if len(steps) == 2:
            in_second_step.set()
            finish_it.wait(10)
        real(fd, offset, length)

    reserve = started((8 * MIB,))
    monkeypatch.setattr(reserve_module, "allocate_pages", recorded)
    with reserve.held():
        fd = reserve.take(8 * MIB, MEMFD_SEALS)
        assert fd is not None
        os.close(fd)
        time.sleep(0.3)
        assert steps == []  # held from the take on: not one step
    assert in_second_step.wait(10)
    with reserve.held():
        # Held while a step runs: that step ends, and no other starts.
        finish_it.set()
        time.sleep(0.3)
        assert len(steps) == 2
        assert reserve.ready_bytes == 0
    wait_for(lambda: reserve.ready_bytes == 8 * MIB)
    assert steps == [offset * MIB for offset in range(8)]


def test_a_load_that_never_ends_delays_the_reserve_but_does_not_stop_it(
    started: Callable[[tuple[int, ...]], MemfdReserve], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reserve_module, "HOLD_PAUSE_S", 0.05)
    reserve = started((4 * MIB,))
    with reserve.held():  # a load stalled on a FUSE server that never answers
        fd = reserve.take(4 * MIB, MEMFD_SEALS)
        assert fd is not None
        os.close(fd)
        wait_for(lambda: reserve.ready_bytes == 4 * MIB)


def test_closing_during_a_step_closes_that_memfd_too(monkeypatch: pytest.MonkeyPatch) -> None:
    in_step, finish_it = threading.Event(), threading.Event()
    real = reserve_module.allocate_pages

    def blocking(fd: int, offset: int, length: int) -> None:
        in_step.set()
        finish_it.wait(10)
        real(fd, offset, length)

    monkeypatch.setattr(reserve_module, "allocate_pages", blocking)
    before = own_fds()
    reserve = MemfdReserve((4 * MIB,))
    reserve.start()
    assert in_step.wait(10)
    threading.Timer(0.1, finish_it.set).start()
    reserve.close()
    assert own_fds() == before
    assert not any(thread.name == "memfd-reserve" for thread in threading.enumerate())


MEMINFO = "MemTotal:       8000000 kB\nMemFree:         100000 kB\nMemAvailable:   {} kB\n"


@pytest.mark.parametrize(
    ("available_kib", "length", "spare"),
    [
        (3_000_000, 1 << 30, True),  # 3 GB available, 1 GiB more leaves about 1.9 GB of 8
        (1_500_000, 1 << 30, False),  # leaves about 0.45 GB, under an eighth (1 GB)
        (1_000_000, 0, True),  # exactly an eighth
    ],
)
def test_can_spare_keeps_an_eighth_of_memory_available(
    tmp_path: Path, available_kib: int, length: int, spare: bool
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO.format(available_kib))
    assert REAL_CAN_SPARE(length, str(meminfo)) is spare


def test_can_spare_says_yes_when_it_cannot_tell(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\n")  # no MemAvailable (Linux before 3.14)
    assert REAL_CAN_SPARE(1 << 40, str(meminfo))
    assert REAL_CAN_SPARE(1 << 40, str(tmp_path / "absent"))


def test_a_memfd_that_cannot_be_sized_is_closed() -> None:
    before = own_fds()
    with pytest.raises(OSError, match="Invalid argument"):
        reserve_module.new_memfd(-1)
    assert own_fds() == before


def test_a_hold_ends_with_its_block_even_on_an_error(
    started: Callable[[tuple[int, ...]], MemfdReserve], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reserve_module, "HOLD_PAUSE_S", 30.0)
    reserve = started((4 * MIB,))

    def failing_load() -> None:
        with reserve.held():
            fd = reserve.take(4 * MIB, MEMFD_SEALS)
            assert fd is not None
            os.close(fd)
            raise RuntimeError("a load failed")

    with pytest.raises(RuntimeError, match="a load failed"):
        failing_load()
    wait_for(lambda: reserve.ready_bytes == 4 * MIB)


def test_a_load_holds_the_reserve_from_its_take_to_its_last_byte(
    started: Callable[[tuple[int, ...]], MemfdReserve], monkeypatch: pytest.MonkeyPatch
) -> None:
    """FileLoader.load, with a broker that stands in for the books: the
    load's allocation takes the prepared memfd, and the thread starts no
    step until the transfer is over."""
    monkeypatch.setattr(reserve_module, "HOLD_PAUSE_S", 30.0)
    reserve = started((4 * MIB,))
    steps: list[int] = []
    real = reserve_module.allocate_pages

    def recorded(fd: int, offset: int, length: int) -> None:
        steps.append(offset)
        real(fd, offset, length)

    monkeypatch.setattr(reserve_module, "allocate_pages", recorded)
    backend = MemfdBackend(HeapSpec("memfd", BackendKind.MEMFD, ""), reserve)
    seen: list[list[int]] = []

    class Broker:
        max_batch = 16

        def eligible(self, *args: object) -> list[MemfdBackend]:
            return [backend]

        def largest_buffer(self, heap: object) -> int:
            return 64 * MIB

        @contextlib.contextmanager
        def provision(self, session: object, heap: MemfdBackend, sizes: list[int], **kwargs: object) -> Iterator[Any]:
            assert kwargs["prepared"] is True
            allocations = [heap.allocate(size, "test", prepared=True) for size in sizes]
            time.sleep(0.1)  # the other allocations of a load, with the interpreter's lock let go
            try:
                yield SimpleNamespace(buffers=[SimpleNamespace(allocation=a) for a in allocations])
            finally:
                for allocation in allocations:
                    allocation.close()

        def deliver(self, *args: object) -> list[object]:
            return []

    class Lanes:
        """Stands for transfer.Transfer."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            self.depth = 1

        def run(self) -> Moved:
            time.sleep(0.3)  # unheld, the thread prepares 4 MiB in a few ms
            seen.append(list(steps))
            return Moved()

    monkeypatch.setattr(loader_module, "Transfer", Lanes)
    monkeypatch.setattr(loader_module, "choose_heap", lambda *args: backend)
    monkeypatch.setattr(loader_module, "choose_method", lambda *args: Method.DIRECT_READ)
    size = 4 * MIB
    source = SimpleNamespace(
        buffered_fd=-1,
        direct_fd=None,
        page_cache_visible=True,
        check_range=lambda offset, length: (offset, length),
        check_unchanged=lambda needed: None,
    )
    request = LoadRequest(0, size, "memfd", "", "test", Method.DIRECT_READ, False, 0)
    session = SimpleNamespace(id=1, peer=SimpleNamespace(pid=1, uid=0))
    loader = FileLoader(LoadingConfig(), broker=Broker(), reserve=reserve)  # type: ignore[arg-type]
    outcome = loader.load(
        session,  # type: ignore[arg-type]
        b"ticket",
        source,  # type: ignore[arg-type]
        request,
        progress=lambda n: None,
        cancelled=lambda: False,
    )
    assert outcome.report.prepared_bytes == size
    assert seen == [[]]
    wait_for(lambda: reserve.ready_bytes == size)
    assert steps == [0]


def test_the_memfd_heap_takes_a_prepared_memfd_when_one_fits(
    started: Callable[[tuple[int, ...]], MemfdReserve],
) -> None:
    reserve = started((8 * MIB,))
    backend = MemfdBackend(HeapSpec("memfd", BackendKind.MEMFD, ""), reserve)
    # Not asked for (an Allocate: it runs on the event loop, and truncating frees pages).
    fresh = backend.allocate(8 * MIB, "test:fresh")
    small = backend.allocate(MIB, "test:small", prepared=True)  # does not fit
    prepared = backend.allocate(8 * MIB, "test:prepared", prepared=True)
    try:
        assert prepared.prepared
        assert prepared.size == 8 * MIB
        assert not fresh.prepared
        assert not small.prepared
        assert os.readlink(f"/proc/self/fd/{fresh.fd}").startswith("/memfd:test:fresh")
        for allocation in (prepared, fresh, small):
            assert fcntl.fcntl(allocation.fd, fcntl.F_GET_SEALS) & MEMFD_SEALS == MEMFD_SEALS
    finally:
        for allocation in (prepared, fresh, small):
            allocation.close()


def test_an_empty_reserve_starts_no_thread() -> None:
    reserve = MemfdReserve(())
    reserve.start()
    assert not any(thread.name == "memfd-reserve" for thread in threading.enumerate())
    assert reserve.take(4096, MEMFD_SEALS) is None
    reserve.close()
