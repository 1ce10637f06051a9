"""Where the daemon's sockets live, agreed by both sides."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, FD_SOCKET_NAME

RUNTIME_DIR_ENV = "DMABUFD_RUNTIME_DIR"
SYSTEM_RUNTIME_DIR = Path("/run/dmabufd")

# The names a service manager passes the two listening sockets under: the
# NAME of `socket NAME ...` in the init .rc (init creates /dev/socket/NAME
# and sets ANDROID_SOCKET_NAME) and FileDescriptorName= in the systemd
# .socket units (LISTEN_FDNAMES). Letters, digits and "_" only: init turns
# any other character into "_" in the variable's name, and an environment
# variable or file name made only of these needs no quoting anywhere.
CONTROL_ACTIVATION_NAME = "dmabufd"
FD_ACTIVATION_NAME = "dmabufd_fd"
ANDROID_SOCKET_DIR = Path("/dev/socket")
ANDROID_SOCKET_ENV_PREFIX = "ANDROID_SOCKET_"


@dataclass(frozen=True)
class SocketPaths:
    control: Path  # gRPC, SOCK_STREAM
    fd: Path  # the fd socket, SOCK_SEQPACKET


def socket_paths(runtime_dir: Path) -> SocketPaths:
    """The two sockets of the daemon listening in `runtime_dir`. In
    /dev/socket they carry init's names (init makes them; nobody else may
    create files there); everywhere else the runtime directory's."""
    if runtime_dir == ANDROID_SOCKET_DIR:
        return SocketPaths(runtime_dir / CONTROL_ACTIVATION_NAME, runtime_dir / FD_ACTIVATION_NAME)
    return SocketPaths(runtime_dir / CONTROL_SOCKET_NAME, runtime_dir / FD_SOCKET_NAME)


def default_runtime_dir() -> Path:
    """$DMABUFD_RUNTIME_DIR; else /dev/socket where init made dmabufd's
    sockets (an Android device); else /run/dmabufd for root, or when a
    system daemon is listening there; else the user's runtime directory
    (an unprivileged daemon for development)."""
    configured = os.environ.get(RUNTIME_DIR_ENV)
    if configured:
        return Path(configured)
    if (ANDROID_SOCKET_DIR / CONTROL_ACTIVATION_NAME).exists():
        return ANDROID_SOCKET_DIR
    if os.geteuid() == 0 or (SYSTEM_RUNTIME_DIR / CONTROL_SOCKET_NAME).exists():
        return SYSTEM_RUNTIME_DIR
    user_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dmabufd-{os.geteuid()}"
    return Path(user_dir) / "dmabufd"
