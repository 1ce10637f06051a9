"""The names of the load methods (see methods.py for what each does)."""

from __future__ import annotations

from enum import IntEnum


class Method(IntEnum):
    # Values match dmabufd.v1.LoadMethod.
    AUTO = 0
    DIRECT_CFR = 1
    DIRECT_READ = 2
    SENDFILE = 3
    SPLICE = 4
    BUFFERED_READ = 5

    @property
    def label(self) -> str:
        """The name people and the CLI use: direct-cfr, buffered-read, ..."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def from_label(cls, label: str) -> Method:
        try:
            return cls[label.upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(method.label for method in cls)
            raise ValueError(f"unknown load method {label!r}; known: {names}") from None


class PartSource(IntEnum):
    """Where a part of a load's bytes came from. Values match
    dmabufd.v1.LoadSource."""

    DEVICE = 1  # O_DIRECT: from the storage device, no page cache
    PAGE_CACHE = 2  # copied from the page cache, which held the part already
    BUFFERED = 3  # read through the page cache (unaligned ends, no direct I/O)
