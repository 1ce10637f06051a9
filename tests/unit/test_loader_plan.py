"""How a load cuts a file range into buffers (loading/loader.py)."""

from __future__ import annotations

import itertools

import pytest

from dmabufd.errors import InvalidRequest
from dmabufd.loading.loader import plan_buffers


@pytest.mark.parametrize(
    ("offset", "length", "largest"),
    list(itertools.product([0, 1, 4095, 4096, 5000], [1, 4096, 8191, 1_000_000], [8192, 12288, 1 << 20])),
)
def test_the_count_checked_first_is_the_count_made(offset: int, length: int, largest: int) -> None:
    plans = plan_buffers(offset, length, largest, most=10_000)
    assert sum(plan.piece.length for plan in plans) == length
    assert all(plan.size <= largest for plan in plans)
    assert plan_buffers(offset, length, largest, most=len(plans)) == plans
    with pytest.raises(InvalidRequest, match=f"need {len(plans)} buffers; a call may make {len(plans) - 1}"):
        plan_buffers(offset, length, largest, most=len(plans) - 1)


def test_a_sparse_file_of_any_size_is_refused_before_planning() -> None:
    """A sparse file may claim 2**62 bytes: counting its plans one by one
    would take the daemon's memory and minutes; it is refused at once."""
    with pytest.raises(InvalidRequest, match="a call may make 256"):
        plan_buffers(0, 1 << 62, 8192, most=256)
