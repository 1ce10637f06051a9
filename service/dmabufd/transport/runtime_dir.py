"""The runtime directory: one daemon per directory, enforced by a lock.

The lock is taken before anything else touches the directory, so a second
daemon refuses to start instead of unlinking the first one's sockets.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, FD_SOCKET_NAME, LOCK_FILE_NAME


class AlreadyRunning(RuntimeError):
    """Another daemon holds the runtime directory."""


class RuntimeDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.control_socket = path / CONTROL_SOCKET_NAME
        self.fd_socket = path / FD_SOCKET_NAME
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


def apply_socket_policy(path: Path, mode: int, group: int | None) -> None:
    """Give a socket file the configured mode and group (clients need write
    permission on a socket file to connect)."""
    if group is not None:
        os.chown(path, -1, group)
    os.chmod(path, mode)
