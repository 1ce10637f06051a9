"""Byte sizes as people write them, and as dmabufd prints them.

Suffixes are binary however they are written: 4K = 4KiB = 4096 bytes, 1.5M
= 1.5MiB, and a bare number (or one ending in B) is bytes. KB, MB, GB and
TB are refused: half the world reads MB as 10^6 bytes and half as 2^20, and
a size that means two things is worse than an error.

Sizes are printed with the IEC names (KiB, MiB, GiB, TiB); rates are
decimal (MB/s, GB/s), as disks and links quote them.
"""

from __future__ import annotations

import re
from fractions import Fraction

MAX_SIZE = (1 << 64) - 1  # what the API's uint64 fields carry

_BINARY = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_UNITS = {"": 1, "B": 1, **_BINARY, **{f"{letter}IB": factor for letter, factor in _BINARY.items()}}
_AMBIGUOUS = {f"{letter}B" for letter in _BINARY}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
EXAMPLES = "4096, 4K, 64M, 1.5G, 2GiB (binary: 1K = 1024 bytes)"


def parse_size(text: str | int) -> int:
    """Bytes in `text`; suffixes are binary (K = KiB = 1024). Raises
    ValueError, with what to write instead, for anything else."""
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"not a size: {text!r} (examples: {EXAMPLES})")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        value = text
    else:
        match = _SIZE.match(text)
        if match is None:
            raise ValueError(f"not a size: {text!r} (examples: {EXAMPLES})")
        number, unit = match.groups()
        key = unit.upper()
        if key in _AMBIGUOUS:
            letter = key[0]
            raise ValueError(
                f"ambiguous size {text!r}: {unit} is 10^{3 * ('KMGT'.index(letter) + 1)} bytes to some and "
                f"2^{10 * ('KMGT'.index(letter) + 1)} to others; write {number}{letter} or {number}{letter}iB "
                f"(binary, 1{letter} = {_BINARY[letter]} bytes)"
            )
        if key not in _UNITS:
            raise ValueError(f"not a size: {text!r} (unknown unit {unit!r}; examples: {EXAMPLES})")
        exact = Fraction(number) * _UNITS[key]
        if exact.denominator != 1:
            raise ValueError(f"size is not a whole number of bytes: {text!r}")
        value = int(exact)
    if value > MAX_SIZE:
        raise ValueError(f"size is too large: {text!r} (at most {MAX_SIZE} bytes)")
    return value


def format_size(size: int) -> str:
    """Render a size for people: exact for whole units, one decimal
    otherwise ("4 KiB", "1.5 MiB"); parse_size reads the exact ones back."""
    for suffix, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= unit:
            whole, rest = divmod(size, unit)
            return f"{whole} {suffix}" if rest == 0 else f"{size / unit:.1f} {suffix}"
    return f"{size} B"


def format_rate(bytes_per_second: float) -> str:
    """Render a transfer rate in decimal units: "850 MB/s", "2.35 GB/s"."""
    if bytes_per_second >= 1e9:
        return f"{bytes_per_second / 1e9:.2f} GB/s"
    if bytes_per_second >= 1e7:
        return f"{bytes_per_second / 1e6:.0f} MB/s"
    return f"{bytes_per_second / 1e6:.1f} MB/s"
