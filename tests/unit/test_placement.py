"""Placement's failures: a CPU set the daemon may not use (service/dmabufd/placement.py)."""

from __future__ import annotations

import logging
import os

import pytest

from dmabufd.placement import Placement
from dmabufd_common.cpus import MAX_CPU

NO_SUCH_CPU = frozenset({MAX_CPU})


def test_a_loop_that_cannot_be_pinned_stops_start_up_naming_the_setting() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(OSError, match=r"scheduling\.call_cpus"):
        Placement(NO_SUCH_CPU).pin_loop()
    assert os.sched_getaffinity(0) == before


def test_a_thread_that_cannot_move_stays_and_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    placement = Placement(NO_SUCH_CPU)
    before = os.sched_getaffinity(0)
    with caplog.at_level(logging.WARNING, logger="dmabufd.placement"):
        for _ in range(3):
            placement.pin_call_thread()
    assert os.sched_getaffinity(0) == before
    assert len([r for r in caplog.records if "threads stay on CPU(s)" in r.getMessage()]) == 1


def test_without_call_cpus_nothing_moves() -> None:
    placement = Placement(None)
    before = os.sched_getaffinity(0)
    placement.pin_loop()
    placement.pin_call_thread()
    placement.unpin_thread()
    assert os.sched_getaffinity(0) == before
