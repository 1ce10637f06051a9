"""The runtime directory: one daemon per directory, enforced by a lock.

The lock is taken before anything else touches the directory, so a second
daemon refuses to start instead of unlinking the first one's sockets.

A daemon whose sockets a service manager created (activation.py) has no
runtime directory: it neither locks nor creates nor unlinks anything, since
the manager runs one instance per socket and owns the socket files. A
daemon started by hand on the directory where such sockets live would find
no lock there, so before it removes a socket file it takes for stale it
checks that nobody accepts on it, and refuses to start if someone does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from dmabufd_common.fdwire import LOCK_FILE_NAME
from dmabufd_common.paths import socket_paths


class AlreadyRunning(RuntimeError):
    """Another daemon holds the runtime directory."""


class RuntimeDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        sockets = socket_paths(path)
        self.control_socket = sockets.control
        self.fd_socket = sockets.fd
        self._lock_path = path / LOCK_FILE_NAME
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another dmabufd (pid {holder}) is running on {self.path}; stop it or choose another --runtime-dir"
            ) from None
        for path, kind in ((self.control_socket, socket.SOCK_STREAM), (self.fd_socket, socket.SOCK_SEQPACKET)):
            if _accepting(path, kind):
                self._lock_path.unlink(missing_ok=True)  # made just now, or stale: ours either way
                os.close(fd)
                raise AlreadyRunning(
                    f"something listens on {path} without holding {self._lock_path} (a dmabufd whose sockets "
                    "init or systemd created?); stop it, or choose another --runtime-dir"
                )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # Sockets left by a daemon that died without cleaning up: ours now.
        for stale in (self.control_socket, self.fd_socket):
            stale.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock_fd is None:
            return
        for socket_path in (self.control_socket, self.fd_socket):
            socket_path.unlink(missing_ok=True)
        self._lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None


def _accepting(path: Path, kind: int) -> bool:
    """Whether a listening socket is bound at `path`. Connecting is the
    only certain test; the connection is closed at once (a daemon sees a
    client that went away)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as probe:
        # EAGAIN: a full backlog, which still means someone listens.
        return probe.connect_ex(str(path)) in (0, errno.EAGAIN)


def apply_socket_policy(path: Path, mode: int, group: int | None) -> None:
    """Give a socket file the configured mode and group (clients need write
    permission on a socket file to connect)."""
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, mode)
