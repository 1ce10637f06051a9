"""Readiness: which tensors of a loading model have all their bytes in."""

from __future__ import annotations

import threading

from dmabufd.loading.models import Readiness
from dmabufd.loading.safetensors import TensorEntry


def entries(*spans: tuple[int, int]) -> tuple[TensorEntry, ...]:
    return tuple(TensorEntry(f"t{index}", "U8", (end - begin,), begin, end) for index, (begin, end) in enumerate(spans))


# t0 and t1 share the first chunk; t2 is zero-size; t3 straddles two chunks.
TENSORS = entries((100, 150), (150, 200), (200, 200), (200, 400))


class Reports:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, indexes: list[int]) -> None:
        self.batches.append(indexes)

    @property
    def all(self) -> list[int]:
        return [index for batch in self.batches for index in batch]


def test_a_tensor_is_ready_when_its_last_byte_lands_in_any_order() -> None:
    reports = Reports()
    readiness = Readiness(TENSORS, reports, hold_back=False)
    readiness.start()
    assert reports.batches == [[2]], "a zero-size tensor is ready at once"
    readiness.landed(300, 100)
    assert reports.all == [2], "half of t3 is not t3"
    assert readiness.first_at is None
    readiness.landed(100, 200)
    assert reports.batches == [[2], [0, 1, 3]]
    assert readiness.first_at is not None
    readiness.finish()
    assert reports.all == [2, 0, 1, 3], "each once"


def test_a_chunk_landing_twice_counts_once() -> None:
    # A load run again by another method copies its chunks again (loader.py).
    reports = Reports()
    readiness = Readiness(TENSORS, reports, hold_back=False)
    readiness.landed(200, 100)
    readiness.landed(200, 100)
    assert 3 not in reports.all, "t3's second half has not landed"
    readiness.landed(300, 100)
    assert reports.all == [3]


def test_held_back_tensors_are_reported_at_the_finish_only() -> None:
    reports = Reports()
    readiness = Readiness(TENSORS, reports, hold_back=True)
    readiness.start()
    readiness.landed(100, 300)
    assert reports.all == [2]
    assert readiness.first_at is not None, "timed all the same"
    readiness.finish()
    assert sorted(reports.all) == [0, 1, 2, 3]


def test_without_a_stream_nothing_is_reported_but_the_first_tensor_is_timed() -> None:
    readiness = Readiness(TENSORS, None, hold_back=False)
    readiness.start()
    readiness.landed(100, 300)
    readiness.finish()
    assert readiness.first_at is not None


def test_lanes_landing_at_once_report_every_tensor_exactly_once() -> None:
    tensors = entries(*((offset, offset + 3000) for offset in range(0, 3000 * 200, 3000)))
    reports = Reports()
    lock = threading.Lock()

    def report(indexes: list[int]) -> None:
        with lock:
            reports(indexes)

    readiness = Readiness(tensors, report, hold_back=False)
    chunks = list(range(0, 3000 * 200, 4096))

    def lane(start: int) -> None:
        for offset in chunks[start::4]:
            readiness.landed(offset, min(4096, 3000 * 200 - offset))

    lanes = [threading.Thread(target=lane, args=(start,)) for start in range(4)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    assert sorted(reports.all) == list(range(200))
    readiness.finish()
    assert len(reports.all) == 200
