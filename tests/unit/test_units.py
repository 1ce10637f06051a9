from __future__ import annotations

import pytest

from dmabufd_common.units import MAX_SIZE, format_rate, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("4096B", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("4KiB", 4096),
        ("4kib", 4096),
        ("64M", 64 << 20),
        ("64MiB", 64 << 20),
        ("1G", 1 << 30),
        ("2GiB", 2 << 30),
        ("1.5M", 3 << 19),
        (" 8 KiB ", 8192),
        ("1T", 1 << 40),
        ("1TiB", 1 << 40),
        ("18446744073709551615", MAX_SIZE),
        (0, 0),
        (12, 12),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "M", "-4K", "4X", "4Mi", "1.0000001K", "four", "4 M B", "4KIBB", "0x10", "16E", "18446744073709551616"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "binary"), [("4MB", "4M or 4MiB"), ("8 kb", "8K or 8KiB"), ("1GB", "1G or 1GiB")])
def test_decimal_looking_units_are_refused_with_what_to_write(text: str, binary: str) -> None:
    with pytest.raises(ValueError, match="ambiguous size") as caught:
        parse_size(text)
    assert binary in str(caught.value)


def test_negative_int_is_rejected() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


def test_bool_is_not_a_size() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(True)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (4096, "4 KiB"), (1536, "1.5 KiB"), (3 << 19, "1.5 MiB"), (8 << 30, "8 GiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size  # what is printed reads back


@pytest.mark.parametrize(("rate", "text"), [(512e3, "0.5 MB/s"), (850e6, "850 MB/s"), (2.345e9, "2.35 GB/s")])
def test_format_rate_is_decimal(rate: float, text: str) -> None:
    assert format_rate(rate) == text
