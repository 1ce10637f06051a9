"""What /proc tells about a client process.

All readers return a neutral value when /proc cannot be read because the
process died or is hidden (hidepid), because accounting must never fail a
call. open_files() and still_held() raise OSError when the daemon itself
is out of fds or memory: callers keep charges then (sessions/ledger.py).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass


def command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return ""


FileIdentity = tuple[int, int]  # (st_dev, st_ino)

# Why /proc/<pid>/... may not be read and the process holds nothing we can
# see: it is gone, or hidden from us. Anything else (EMFILE, ENOMEM) is the
# daemon's own trouble, and a check that cannot be made is not "nothing
# held": such errors are raised.
_GONE_OR_HIDDEN = (errno.ENOENT, errno.ESRCH, errno.EACCES, errno.EPERM)


@dataclass(frozen=True)
class ProcHoldings:
    """Which of the given files a process has open."""

    readable: bool
    files: frozenset[FileIdentity]
    # How many fds the process has (walked, unless over the limit asked).
    fds: int = 0


@dataclass(frozen=True)
class DmabufHoldings:
    """Every dma-buf a process has open, by fdinfo, each buffer once."""

    readable: bool
    count: int
    bytes: int


# What /proc/<pid>/fd/<n> reads for the kinds of file a buffer is: a memfd
# ("/memfd:NAME (deleted)") and a dma-buf ("/dmabuf:NAME"). Only fds whose
# link starts so are looked at further. Reading a link only prints a name;
# stat() through it would ask a FUSE file's server, and reading another
# kind's fdinfo may wait on a lock (an epoll's, while it polls a FUSE
# file): a client must not be able to make a check wait. A memfd's fdinfo
# is the generic lines only, a dma-buf's adds a few under a spinlock. A
# file that only sits at a path so named (a device bind-mounted there in
# the client's own mount namespace) gets its fdinfo read too, whose
# show_fdinfo may take a kernel lock for a while: that holds one /proc
# helper (sessions/holders.py), never the event loop, and matches at most
# an inode number.
MEMFD_LINK = "/memfd:"
DMABUF_LINK = ("/dmabuf:", "anon_inode:dmabuf")  # the second before Linux 5.3
# fdinfo is read this far: locks held on the file print a line each before
# a dma-buf's own lines.
FDINFO_BYTES = 65536


def _fd_fields(fd_dir: str, name: str, kinds: tuple[str, ...]) -> dict[str, str] | None:
    """The fdinfo fields of /proc/<pid>/fd/<name> if its link starts with
    one of `kinds`; None otherwise, or if it is gone."""
    try:
        if not os.readlink(f"{fd_dir}/fd/{name}").startswith(kinds):
            return None
        info = os.open(f"{fd_dir}/fdinfo/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(info, FDINFO_BYTES).decode("ascii", "replace")
        finally:
            os.close(info)
    except OSError as error:
        if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # the daemon's trouble: the caller decides
            raise
        return None
    # The first line of each key counts: the kernel's own lines (pos, flags,
    # mnt_id, ino, then a dma-buf's size, count, exp_name) come before a
    # dma-buf's name:, which any holder may set (DMA_BUF_SET_NAME), newlines
    # and all, to print lines of its choosing.
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def dmabufs_of(pid: int) -> DmabufHoldings:
    """What /proc/<pid>/fdinfo says the process holds in dma-bufs: its
    size: line gives a dma-buf's bytes. Several fds of one buffer (same
    inode) count once."""
    proc_dir = f"/proc/{pid}"
    try:
        names = os.listdir(f"{proc_dir}/fd")
    except OSError:
        return DmabufHoldings(False, 0, 0)
    sizes: dict[int, int] = {}
    for name in names:
        try:
            fields = _fd_fields(proc_dir, name, DMABUF_LINK)
        except OSError:
            return DmabufHoldings(False, 0, 0)
        if fields is None or "exp_name" not in fields:
            continue
        if fields.get("size", "").isdigit() and fields.get("ino", "").isdigit():
            sizes[int(fields["ino"])] = int(fields["size"])
    return DmabufHoldings(True, len(sizes), sum(sizes.values()))


def open_files(pid: int, wanted: Iterable[FileIdentity], most: int | None = None) -> ProcHoldings:
    """Walk /proc/<pid>/fd and report which `wanted` files are open there.
    A process with more than `most` fds is not walked: it is reported
    holding every wanted file.

    A memfd or dma-buf fd matches a wanted file by the inode number its
    fdinfo gives (the links are read first: see MEMFD_LINK). By inode number
    alone, so a false match is possible (a dma-buf and a memfd of the same
    number): it keeps a charge, and only of the process's own uid.
    """
    wanted_set = frozenset(wanted)
    by_inode: dict[int, list[FileIdentity]] = {}
    for identity in wanted_set:
        by_inode.setdefault(identity[1], []).append(identity)
    proc_dir = f"/proc/{pid}"
    try:
        names = os.listdir(f"{proc_dir}/fd")
    except OSError as error:
        if error.errno not in _GONE_OR_HIDDEN:  # out of fds or memory: the caller decides
            raise
        return ProcHoldings(False, frozenset())
    if most is not None and len(names) > most:
        return ProcHoldings(True, wanted_set, len(names))
    seen: set[FileIdentity] = set()
    for name in names:
        fields = _fd_fields(proc_dir, name, (MEMFD_LINK, *DMABUF_LINK))
        if fields is None:
            continue
        inode = fields.get("ino", "")
        if not inode.isdigit():  # before Linux 5.14 fdinfo names no inode: it may be any of them
            seen.update(wanted_set)
            continue
        seen.update(by_inode.get(int(inode), ()))
    return ProcHoldings(True, frozenset(seen), len(names))


# A process's maps are read up to this much; one with more (a client that
# maps thousands of regions to make its releases slow) is taken to hold
# everything it was asked about, so the cost of a check stays bounded.
MAX_MAPS_BYTES = 1 << 20


# The dev and inode of each line of /proc/<pid>/maps ("address perms
# offset major:minor inode [path]", hex device numbers); lines with inode 0
# (anonymous memory) do not match.
_MAPS_FILE = re.compile(rb"^\S+ \S+ \S+ ([0-9a-f]+):([0-9a-f]+) ([1-9][0-9]*)", re.MULTILINE)


def _mapped(pid: int, wanted: frozenset[FileIdentity]) -> tuple[set[FileIdentity], int]:
    """Which `wanted` files /proc/<pid>/maps shows mapped (a mapping keeps
    a buffer alive after its last fd is closed), and how many bytes of
    maps were read."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            text = maps.read(MAX_MAPS_BYTES + 1)
    except OSError as error:
        if error.errno not in _GONE_OR_HIDDEN:
            raise
        return set(), 0
    if len(text) > MAX_MAPS_BYTES:
        return set(wanted), len(text)
    # Every release asks, and a Python client maps hundreds of files: the
    # regex finds the candidates, and only lines naming a wanted inode are
    # looked at further.
    by_inode: dict[bytes, list[FileIdentity]] = {}
    for identity in wanted:
        by_inode.setdefault(str(identity[1]).encode(), []).append(identity)
    found: set[FileIdentity] = set()
    for major, minor, inode in _MAPS_FILE.findall(text):
        for identity in by_inode.get(inode, ()):
            if os.makedev(int(major, 16), int(minor, 16)) == identity[0]:
                found.add(identity)
    return found, len(text)


def processes_of(uid: int) -> list[int]:
    """Every process whose /proc entry belongs to `uid` (its real owner for
    this purpose: /proc/<pid> is owned by the process's effective uid)."""
    pids: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid == uid:
                pids.append(int(name))
        except OSError:
            continue
    return pids


# The fds one check walks, over every process it looks at: a uid that keeps
# thousands of fds open in many processes would otherwise make each of its
# releases cost seconds of a thread the other clients share. Past it, the
# files not found yet are taken as held: they stay charged, and the reaper
# looks again later.
MAX_FDS_PER_CHECK = 16384
# What looking at one process costs that budget besides its fds: 16 for
# listing them, and one per KiB of its maps read (reading and matching 1 MiB
# of maps costs about what 1,000 fds do).
PROCESS_COST = 16
MAPS_BYTES_PER_UNIT = 1024


@dataclass(frozen=True)
class HolderQuery:
    """Which of `wanted` files the processes `pids`, or any process of
    `uids`, hold: what a released buffer's charge waits on."""

    pids: tuple[int, ...]
    uids: tuple[int, ...]
    wanted: tuple[FileIdentity, ...]


def held(query: HolderQuery) -> frozenset[FileIdentity]:
    """Answer `query` from /proc (still_held() over its processes). When
    /proc cannot be read (the daemon is out of fds, say), every wanted file
    is taken as held: a charge is kept rather than lost, and the reaper
    looks again."""
    if not query.wanted:
        return frozenset()
    try:
        pids = set(query.pids)
        for uid in query.uids:
            pids.update(processes_of(uid))
        return still_held(sorted(pids), query.wanted)
    except OSError:
        return frozenset(query.wanted)


def still_held(pids: Iterable[int], wanted: Iterable[FileIdentity]) -> frozenset[FileIdentity]:
    """Which `wanted` files any of `pids` holds, by an fd or a mapping
    (all of them, once the processes and fds looked at passed
    MAX_FDS_PER_CHECK)."""
    remaining = frozenset(wanted)
    held: set[FileIdentity] = set()
    own = os.getpid()
    budget = MAX_FDS_PER_CHECK
    for pid in pids:
        if not remaining:
            break
        if pid == own:
            continue
        budget -= PROCESS_COST
        holdings = open_files(pid, remaining, most=max(0, budget))
        budget -= holdings.fds
        if budget < 0:
            return frozenset(held | remaining)
        mapped, maps_bytes = _mapped(pid, remaining)
        budget -= maps_bytes // MAPS_BYTES_PER_UNIT
        found = set(holdings.files) | mapped
        held |= found
        remaining = remaining - found
    return frozenset(held)
