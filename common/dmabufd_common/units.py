"""Byte sizes as people write them: "4096", "4K", "64M", "1.5G", "2GiB"."""

from __future__ import annotations

import re

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a size; suffixes are binary (K = 1024). Raises ValueError."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 4K, 64M, 1G)")
    number, suffix = match.groups()
    value = float(number) * _SUFFIXES[suffix.upper()]
    if value != int(value):
        raise ValueError(f"size is not a whole number of bytes: {text!r}")
    return int(value)


def format_size(size: int) -> str:
    """Render a size for people: exact for whole units, one decimal otherwise."""
    for suffix, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= unit:
            whole, rest = divmod(size, unit)
            return f"{whole} {suffix}" if rest == 0 else f"{size / unit:.1f} {suffix}"
    return f"{size} B"
