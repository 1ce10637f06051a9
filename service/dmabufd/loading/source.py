"""The file a load reads, and the rule that guards it: the daemon reads only
what the client itself could have read.

- An fd sent by the client (FILE frame) must have been opened for reading:
  O_PATH fds (which grant no right to read; their F_GETFL access mode
  reads as O_RDONLY all the same) and write-only fds are refused, or the
  daemon would read a file for a client that may only name it.
- Every open the daemon makes for a client runs with the client's
  file-system uid, gid and groups (credentials.py), so the kernel's own
  checks (modes, ACLs, LSMs) decide, never the daemon's privileges. That
  includes the O_DIRECT reopen of a client's fd through /proc/self/fd/N:
  if the client could not open the file itself, there is no O_DIRECT fd
  and the load reads through the client's own fd. A daemon that is not
  root cannot take another uid's identity, so it never reopens for one.
- A path is accepted only lexically inside a configured root (compared
  component by component, without touching the file system), and the rest
  of it is resolved by the kernel in one step, race-free, with openat2()
  relative to the root: RESOLVE_BENEATH (no "..", absolute symlink or
  mount crossing out of it) and RESOLVE_NO_MAGICLINKS (no /proc/*/fd or
  /proc/*/root jumps). The roots are trusted configuration.

Lifetime of the fds:
- The client's fd (from_client_fd) and the fd openat2 returns (open_as_client)
  become the SourceFile's buffered_fd; the SourceFile owns it from then on,
  and the caller lets it go with SourceFile.close(). When from_client_fd or
  the SourceFile constructor refuses a file, it lets the fd go itself before
  raising, so the caller has nothing to close.
- direct_fd (the O_DIRECT reopen, or None) belongs to the SourceFile too and
  goes with SourceFile.close().
- Letting go of a file is handing it to the closer (transport/closer.py),
  never os.close() here: the last close of a client's file can block.
- The O_PATH fd of a root lives only for one open_as_client() call, which
  closes it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import platform
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dmabufd.errors import (
    AccessDenied,
    DmabufdError,
    FileChanged,
    FileNotFound,
    InvalidRequest,
    OutOfRange,
    Overloaded,
    bounded,
)
from dmabufd.loading import credentials
from dmabufd.loading.methods import DIO_ALIGN
from dmabufd.sessions.session import Peer
from dmabufd.transport.closer import Closer
from dmabufd_common import uapi

log = logging.getLogger(__name__)

# PATH_MAX counts the terminating NUL, so the kernel takes at most 4095
# bytes; anything past 4096 is refused before any system call.
MAX_PATH_BYTES = 4096

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}

# include/uapi/linux/openat2.h
_OPENAT2 = {"x86_64": 437, "aarch64": 437, "arm64": 437}
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
# O_NONBLOCK: opening a FIFO must not wait for a writer (the fstat check
# then refuses it); it changes nothing for reading a regular file.
# O_NOCTTY: a terminal inside a root must not become the daemon's.
_PATH_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# The kernel reports a ".." it could not prove stayed beneath the root,
# because something was renamed meanwhile, as EAGAIN: retry a few times.
_RESOLVE_ATTEMPTS = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


@dataclass(frozen=True)
class FileIdentity:
    """What makes two loads the same file (for sharing resident models).

    The ctime is in it because nobody can set it: a file's owner can put
    back its mtime after rewriting it, and a deleted file's inode number is
    given to the next file made on that file system, possibly another
    uid's, made to the same size and mtime."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class SourceFile:
    """An open file to load from. Owns both fds; close() releases them.

    Takes ownership of `fd` at once: if the file is refused (not a regular
    file), the fd is closed before the error is raised."""

    def __init__(self, fd: int, description: str, peer: Peer, closer: Closer) -> None:
        self._closer = closer
        self._uid = peer.uid
        self.buffered_fd = fd
        self.direct_fd: int | None = None
        self.description = description
        try:
            info = os.fstat(fd)
            kind = stat.S_IFMT(info.st_mode)
            if kind != stat.S_IFREG:
                raise InvalidRequest(f"{description} is {_KINDS.get(kind, 'not a regular file')}, not a regular file")
            self.identity = FileIdentity.of(info)
            # What the client may learn of the page cache (cachestat): the
            # kernel tells only a caller that may write the file or owns it.
            self.page_cache_visible = (
                peer.uid in (0, info.st_uid) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
            )
            # A block device's number: the file's data lives on it. Memory,
            # network and pseudo file systems have anonymous device numbers
            # (major 0), and the kernel series copies only with files on a
            # block device (anything else is EXDEV).
            self.block_backed = os.major(info.st_dev) != 0
            self.direct_fd = _reopen_direct(fd, info, peer, closer)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return self.identity.size

    def check_unchanged(self, needed: int) -> None:
        """FileChanged if the file no longer holds `needed` bytes, or was
        written or replaced in place since it was opened (its identity
        moved): what was loaded may mix old and new bytes."""
        now = FileIdentity.of(os.fstat(self.buffered_fd))
        if now.size < needed:
            raise FileChanged("the file was truncated while loading")
        if now != self.identity:
            raise FileChanged(f"{self.description} changed while it was being loaded; load it again")

    def check_range(self, offset: int, length: int) -> tuple[int, int]:
        """(offset, length) with length 0 meaning "to the end"; refuses
        ranges outside the file."""
        size = self.size
        if offset > size or (offset == size and size > 0):
            raise OutOfRange(f"offset {offset} is past the end of {self.description} ({size} bytes)")
        if length == 0:
            length = size - offset
        if offset + length > size:
            raise OutOfRange(
                f"{length} bytes from offset {offset} run past the end of {self.description} ({size} bytes)"
            )
        if length == 0:
            raise InvalidRequest(f"{self.description} is empty: nothing to load")
        return offset, length

    def close(self) -> None:
        """Let go of the file through the closer: closing a client's file
        can block (transport/closer.py)."""
        self._closer.close(self._uid, [fd for fd in (self.buffered_fd, self.direct_fd) if fd is not None])
        self.buffered_fd = -1
        self.direct_fd = None


def _as_client(peer: Peer, action: Callable[[], int]) -> int | None:
    """Run an open with the peer's file-system identity; None where the
    daemon cannot take it (not root, and the peer is another uid)."""
    euid = os.geteuid()
    if euid == peer.uid:
        return action()
    if euid != 0:
        return None
    return credentials.open_as(peer.uid, peer.gid, peer.groups, action)


def _reopen_direct(fd: int, info: os.stat_result, peer: Peer, closer: Closer) -> int | None:
    """An O_DIRECT descriptor of the same file, opened as the client, or
    None: the client may not open the file itself (it sent an fd it was
    given), the daemon cannot act as the client, or the file system does
    no direct I/O (tmpfs before 6.6, 9p, overlayfs...). Loads then read
    the buffered fd, so any failure here only costs speed."""
    magic = f"/proc/self/fd/{fd}"
    # O_NONBLOCK: an open that would wait for a file lease to be broken
    # (which its holder can make last lease-break-time) fails at once, and
    # the load reads the buffered fd instead. Cleared once open.
    flags = os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        direct = _as_client(peer, lambda: os.open(magic, flags))
    except OSError as error:
        log.debug("no O_DIRECT reopen for uid %d: %s", peer.uid, error)
        return None
    if direct is None:
        return None
    try:
        usable = _usable_direct(direct, info)
    except OSError as error:  # a file system that fails these: buffered reads
        log.debug("no O_DIRECT reopen for uid %d: %s", peer.uid, error)
        usable = False
    if not usable:
        closer.close(peer.uid, [direct])
        return None
    return direct


def _usable_direct(direct: int, info: os.stat_result) -> bool:
    """Whether the O_DIRECT reopen `direct` of the file `info` describes is
    the same file and reads directly at the loads' alignment (it is made
    blocking here)."""
    fcntl.fcntl(direct, fcntl.F_SETFL, fcntl.fcntl(direct, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    # The magic link names the open file itself, so this holds; checked
    # anyway because reading another file would break the rule silently.
    again = os.fstat(direct)
    if (again.st_dev, again.st_ino) != (info.st_dev, info.st_ino):
        return False
    # O_DIRECT is only direct where the file system says so: f2fs and ext4
    # take the page cache for encrypted, verity or compressed files (and
    # f2fs for anything finer than its block), and the kernel series
    # refuses such copies. Loads lay data out on DIO_ALIGN boundaries.
    alignment = uapi.dio_alignment(direct)
    if alignment is not None and not (
        alignment.direct and DIO_ALIGN % alignment.offset == 0 and DIO_ALIGN % alignment.memory == 0
    ):
        log.debug("no direct I/O at %d-byte alignment on this file (%s): buffered reads", DIO_ALIGN, alignment)
        return False
    return True


def from_client_fd(fd: int, peer: Peer, closer: Closer) -> SourceFile:
    """Take ownership of an fd the client `peer` sent (let go here if refused)."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as error:
        closer.close(peer.uid, [fd])
        raise InvalidRequest(f"the file descriptor sent is unusable: {os.strerror(error.errno or 0)}") from None
    if flags & os.O_PATH:
        closer.close(peer.uid, [fd])
        raise AccessDenied(
            "the file descriptor sent was opened with O_PATH, which gives no right to read the file: "
            "open the file for reading and send that fd"
        )
    if flags & os.O_DIRECT:
        closer.close(peer.uid, [fd])
        raise InvalidRequest(
            "the file descriptor sent was opened with O_DIRECT, which reads only aligned ranges: send one opened "
            "without it (the daemon reads the file with direct I/O itself where it can)"
        )
    if flags & os.O_ACCMODE not in (os.O_RDONLY, os.O_RDWR):
        closer.close(peer.uid, [fd])
        raise AccessDenied(
            "the file descriptor sent is open for writing only, or for neither reading nor writing: "
            "open the file for reading and send that fd"
        )
    return SourceFile(fd, "the file descriptor sent", peer, closer)


def _components(path: str) -> list[str]:
    # "" (from "//") and "." name nothing: the kernel skips them too.
    return [part for part in path.split("/") if part not in ("", ".")]


def _beneath(path: str, root: list[str]) -> str | None:
    """The part of absolute `path` below `root` (its components), as the
    client wrote it, or None if `path` is not lexically inside `root`."""
    parts = path.split("/")
    matched = 0
    for index, part in enumerate(parts):
        if matched == len(root):
            # A leading "/" would make openat2 resolve from "/" (EXDEV).
            return "/".join(parts[index:]).lstrip("/") or "."
        if part in ("", "."):
            continue
        if part != root[matched]:
            return None
        matched += 1
    return "." if matched == len(root) else None


def _choose_root(path: str, roots: tuple[Path, ...]) -> tuple[Path, str] | None:
    """(root, rest) for the outermost root `path` lies in: every root is
    one the client may read beneath, so the outermost allows the most."""
    best: tuple[Path, str, int] | None = None
    for root in roots:
        # The root as configured and as it really is, so a client may name
        # a file through either spelling (the root is trusted config).
        for spelling in dict.fromkeys((str(root), os.path.realpath(root))):
            components = _components(spelling)
            rest = _beneath(path, components)
            if rest is not None and (best is None or len(components) < best[2]):
                best = (root, rest, len(components))
    return None if best is None else (best[0], best[1])


def _openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    number = _OPENAT2.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"openat2 is not wired up for {platform.machine()}")
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(
        ctypes.c_long(number),
        ctypes.c_long(dirfd),
        ctypes.c_char_p(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(fd)


def _resolve(dirfd: int, rest: bytes) -> int:
    for _ in range(_RESOLVE_ATTEMPTS - 1):
        try:
            return _openat2(dirfd, rest, _PATH_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EINTR):
                raise
    return _openat2(dirfd, rest, _PATH_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)


def _check_path(path: str) -> bytes:
    """The path as the kernel will see it; refuses what no open could take
    before any system call, at a cost linear in its length."""
    if "\0" in path:
        raise InvalidRequest(f"path {bounded(path)} contains a NUL byte; name the file without it")
    try:
        encoded = os.fsencode(path)
    except UnicodeError:
        raise InvalidRequest(f"path {bounded(path)} cannot be encoded for the file system") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidRequest(
            f"path {bounded(path)} is {len(encoded)} bytes long; a path may have at most {MAX_PATH_BYTES}"
        )
    if not path.startswith("/"):
        raise InvalidRequest(f"path {bounded(path)} is not absolute; name the file from /")
    return encoded


def _roots_text(roots: tuple[Path, ...]) -> str:
    return ", ".join(bounded(str(root)) for root in roots)


def open_as_client(path: str, peer: Peer, roots: tuple[Path, ...], closer: Closer) -> SourceFile:
    """Open `path` for `peer`, beneath one of `roots`, with the peer's
    credentials. The caller owns the SourceFile and closes it."""
    if not roots:
        raise AccessDenied("this daemon loads no files by path (loading.roots is empty); send an fd instead")
    _check_path(path)
    chosen = _choose_root(path, roots)
    if chosen is None:
        raise AccessDenied(
            f"{bounded(path)} is outside the directories this daemon loads from ({_roots_text(roots)}); "
            "send an fd instead"
        )
    root, rest = chosen
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise FileNotFound(
            f"the directory {bounded(str(root))} this daemon loads from cannot be opened "
            f"({os.strerror(error.errno or 0)}); ask its administrator, or send an fd instead"
        ) from None
    try:
        encoded = os.fsencode(rest)
        try:
            fd = _as_client(peer, lambda: _resolve(root_fd, encoded))
        except credentials.TooManyOpens as error:
            raise Overloaded(f"{error.strerror}; try again once they have finished or failed") from None
        except OSError as error:
            raise _open_error(path, error.errno or 0, peer.uid, roots) from None
    finally:
        os.close(root_fd)
    if fd is None:
        raise AccessDenied("the daemon cannot open files as another user (it is not root); send an fd instead")
    return SourceFile(fd, bounded(path), peer, closer)


def _open_error(path: str, code: int, uid: int, roots: tuple[Path, ...]) -> DmabufdError:
    shown = bounded(path)
    reason = os.strerror(code)
    if code == errno.EXDEV:
        return AccessDenied(
            f"{shown} leads outside the directories this daemon loads from ({_roots_text(roots)}) "
            "through '..', an absolute symbolic link or a mount point; send an fd instead"
        )
    if code == errno.ELOOP:
        return AccessDenied(
            f"{shown} goes through a /proc magic link or too many symbolic links, which could lead outside "
            f"the directories this daemon loads from ({_roots_text(roots)}); name the file itself, or send an fd"
        )
    if code in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"uid {uid} may not read {shown}: {reason}")
    if code == errno.ENOENT:
        return FileNotFound(f"{shown} does not exist: {reason}")
    if code == errno.ENAMETOOLONG:
        return InvalidRequest(f"path {shown} has a component longer than the file system allows: {reason}")
    if code == errno.ENXIO:
        return InvalidRequest(f"{shown} is a socket or a device with nothing behind it, not a regular file")
    if code == errno.ENOSYS:
        return InvalidRequest(
            "this kernel lacks openat2 (Linux 5.6 or later), which loading by path needs; send an fd instead"
        )
    if code in (errno.EAGAIN, errno.EINTR):
        return FileChanged(
            f"directories on the way to {shown} kept being renamed while it was opened; try again "
            "(a path without '..' is not affected)"
        )
    if code == errno.ETIMEDOUT:
        return InvalidRequest(f"opening {shown} did not finish in time; its file system may be hung")
    return InvalidRequest(f"cannot open {shown}: {reason}")
