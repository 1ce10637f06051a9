"""The buffers a process holds, read from /proc as Android's dmabuf_dump
reads them: every fd that is a dma-buf (its fdinfo has exp_name:) or a
memfd (how dmabufd's memfd heap hands out buffers), each buffer once."""

from __future__ import annotations

import os
from dataclasses import dataclass

MEMFD_PREFIX = "/memfd:"
DMABUF_PREFIXES = ("/dmabuf:", "anon_inode:dmabuf")


@dataclass(frozen=True)
class HeldBuffer:
    name: str
    size: int
    inode: int
    exporter: str  # the dma-buf's exporter (its heap), or "memfd"


def _fdinfo(pid: int, fd: str) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", encoding="utf-8", errors="replace") as info:
            return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in info)}
    except OSError:
        return {}


def held_buffers(pid: int) -> list[HeldBuffer] | None:
    """The process's buffers by inode order; None when /proc/<pid>/fd
    cannot be read (another uid's process, without root)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    found: dict[int, HeldBuffer] = {}
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            if not target.startswith((MEMFD_PREFIX, *DMABUF_PREFIXES)):
                continue
            info = os.stat(f"{fd_dir}/{fd}")  # the buffer's own inode; its size is the buffer's
        except OSError:
            continue  # closed meanwhile
        if info.st_ino in found:
            continue
        if target.startswith(MEMFD_PREFIX):
            name = target.removeprefix(MEMFD_PREFIX).removesuffix(" (deleted)")
            found[info.st_ino] = HeldBuffer(name, info.st_size, info.st_ino, "memfd")
            continue
        fields = _fdinfo(pid, fd)
        if "exp_name" not in fields:
            continue
        name = fields.get("name") or target.removeprefix("/dmabuf:").removeprefix("anon_inode:dmabuf") or "<unknown>"
        size = int(fields["size"]) if fields.get("size", "").isdigit() else info.st_size
        found[info.st_ino] = HeldBuffer(name, size, info.st_ino, fields["exp_name"])
    return [found[inode] for inode in sorted(found)]
