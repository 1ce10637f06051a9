"""Where the daemon's sockets live, agreed by both sides."""

from __future__ import annotations

import os
from pathlib import Path

RUNTIME_DIR_ENV = "DMABUFD_RUNTIME_DIR"
SYSTEM_RUNTIME_DIR = Path("/run/dmabufd")


def default_runtime_dir() -> Path:
    """$DMABUFD_RUNTIME_DIR; else /run/dmabufd for root, or when a system
    daemon is listening there; else the user's runtime directory (an
    unprivileged daemon for development)."""
    configured = os.environ.get(RUNTIME_DIR_ENV)
    if configured:
        return Path(configured)
    if os.geteuid() == 0 or (SYSTEM_RUNTIME_DIR / "dmabufd.sock").exists():
        return SYSTEM_RUNTIME_DIR
    user_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dmabufd-{os.geteuid()}"
    return Path(user_dir) / "dmabufd"
