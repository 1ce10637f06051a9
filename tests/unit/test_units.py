from __future__ import annotations

import pytest

from dmabufd_common.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("1.5M", 3 << 19),
        (" 8 KB ", 8192),
        ("1T", 1 << 40),
        (0, 0),
        (12, 12),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-4K", "4X", "1.0000001K", "four", "4 M B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_negative_int_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (4096, "4 KiB"), (1536, "1.5 KiB"), (8 << 30, "8 GiB")]
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
