"""The file a load reads, and the rule that guards it: the daemon reads only
what the client itself could have read.

- An fd sent by the client (FILE frame) was opened by the client: the
  daemon checks it is a regular file open for reading, then reopens it
  through /proc/self/fd to get its own O_DIRECT descriptor (the client's
  open file description, and its flags and position, are never touched).
- A path is accepted only under configured roots, after resolving symlinks,
  and is opened with the client's file-system uid, gid and groups (see
  credentials.py), so the kernel's own permission checks (modes, ACLs,
  LSMs) decide, not a re-implementation of them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dmabufd.errors import AccessDenied, DmabufdError, FileNotFound, InvalidRequest, OutOfRange
from dmabufd.loading import credentials
from dmabufd.sessions.session import Peer

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


@dataclass(frozen=True)
class FileIdentity:
    """What makes two loads the same file (for sharing resident models)."""

    device: int
    inode: int
    size: int
    mtime_ns: int


class SourceFile:
    """An open file to load from. Owns both fds; close() releases them."""

    def __init__(self, fd: int, description: str) -> None:
        self.buffered_fd = fd
        self.description = description
        info = os.fstat(fd)
        kind = stat.S_IFMT(info.st_mode)
        if kind != stat.S_IFREG:
            self.close()
            raise InvalidRequest(f"{description} is {_KINDS.get(kind, 'not a regular file')}, not a regular file")
        self.identity = FileIdentity(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        self.direct_fd = self._reopen_direct()

    @property
    def size(self) -> int:
        return self.identity.size

    def _reopen_direct(self) -> int | None:
        """An O_DIRECT descriptor of the same file, or None where the file
        system does not do direct I/O (tmpfs before 6.6, 9p, overlayfs...)."""
        try:
            return os.open(f"/proc/self/fd/{self.buffered_fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EACCES, errno.EPERM):
                return None
            raise

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
        for fd in (self.buffered_fd, getattr(self, "direct_fd", None)):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.buffered_fd = -1
        self.direct_fd = None


def from_client_fd(fd: int) -> SourceFile:
    """Take ownership of an fd the client sent."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
        os.close(fd)
        raise AccessDenied("the file descriptor sent is open for writing only; open it for reading")
    return SourceFile(fd, "the file descriptor sent")


def _under(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def open_as_client(path: str, peer: Peer, roots: tuple[Path, ...]) -> SourceFile:
    """Open `path` for `peer`, with the peer's credentials."""
    if not roots:
        raise AccessDenied("this daemon loads no files by path (loading.roots is empty); send an fd instead")
    if not os.path.isabs(path):
        raise InvalidRequest(f"path {path!r} is not absolute")
    resolved = Path(os.path.realpath(path))
    real_roots = tuple(Path(os.path.realpath(root)) for root in roots)
    if not _under(resolved, real_roots):
        allowed = ", ".join(str(root) for root in roots)
        raise AccessDenied(f"{path} is outside the directories this daemon loads from ({allowed}); send an fd instead")
    fd = _open_with_credentials(str(resolved), peer)
    return SourceFile(fd, path)


def _open_with_credentials(path: str, peer: Peer) -> int:
    if os.geteuid() == peer.uid:
        return _open_here(path, peer.uid)
    if os.geteuid() != 0:
        raise AccessDenied("the daemon cannot open files as another user (it is not root); send an fd instead")
    return credentials.open_as(peer.uid, peer.gid, peer.groups, lambda: _open_here(path, peer.uid))


def _open_here(path: str, uid: int) -> int:
    # O_NONBLOCK: opening a FIFO must not wait for a writer (the fstat check
    # then refuses it); it changes nothing for reading a regular file.
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise _open_error(path, error.errno or 0, uid) from None


def _open_error(path: str, code: int, uid: int) -> DmabufdError:
    reason = os.strerror(code)
    if code in (errno.EACCES, errno.EPERM):
        return AccessDenied(f"uid {uid} may not read {path}: {reason}")
    if code == errno.ENOENT:
        return FileNotFound(f"{path}: {reason}")
    return InvalidRequest(f"cannot open {path}: {reason}")


def close_quietly(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
