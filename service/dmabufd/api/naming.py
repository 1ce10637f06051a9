"""Buffer names: what a client asks for, and what the kernel shows.

The kernel name is "<pid>:<label>", so fdinfo, /proc/<pid>/maps and
debugfs tell at a glance which client a buffer was made for, even after the
fd has been passed on. It fits DMA_BUF_NAME_LEN (31 bytes + NUL): a pid has
at most 7 digits (pid_max <= 4194304) and a label at most 23 bytes.
"""

from __future__ import annotations

from dmabufd.errors import InvalidRequest

MAX_LABEL_BYTES = 23
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+=@,/")


def kernel_name(pid: int, label: str, fallback: str) -> str:
    """Validate a client's label and build the buffer's kernel name."""
    if not label:
        label = fallback[:MAX_LABEL_BYTES]
    if len(label.encode("utf-8")) > MAX_LABEL_BYTES:
        raise InvalidRequest(f"buffer name {label[:40]!r} is longer than {MAX_LABEL_BYTES} bytes")
    if not _ALLOWED.issuperset(label):
        bad = sorted({char for char in label if char not in _ALLOWED})
        shown = ", ".join(repr(char) for char in bad[:5])
        raise InvalidRequest(f"buffer name may hold letters, digits and ._-+=@,/ only; found {shown}")
    return f"{pid}:{label}"
