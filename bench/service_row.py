"""The ninth row: the same file loaded through a running dmabufd with the Python client.

The client's load_file is being written; until it exists the row is skipped with a reason.
Its planned shape: client.load_file(fd_or_path, offset=0, length=0, heap="", usage=...,
name=..., method="auto", verify=False, max_buffer_bytes=...) returns an object with .buffers
(Buffer objects), .method, .bytes, .wall_seconds, .cpu_seconds (the daemon's) and .close().
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import dmabufd_client
from dmabufd_client import Buffer
from dmabufd_common.fdwire import LOCK_FILE_NAME

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 1800.0  # a 1 GiB load under QEMU TCG takes minutes
LOAD_FILE = "load_file"


class LoadedFile(Protocol):
    """What Client.load_file returns (the planned shape)."""

    @property
    def buffers(self) -> Sequence[Buffer]: ...
    @property
    def method(self) -> str: ...
    @property
    def bytes(self) -> int: ...
    @property
    def wall_seconds(self) -> float: ...
    @property
    def cpu_seconds(self) -> float: ...
    def close(self) -> None: ...


LoadFile = Callable[..., LoadedFile]


def load_file_of(client: dmabufd_client.Client) -> LoadFile | None:
    """The client's load_file, or None while the client has none."""
    if not hasattr(dmabufd_client.Client, LOAD_FILE):
        return None
    return cast(LoadFile, getattr(client, LOAD_FILE))


def has_load_file() -> bool:
    return hasattr(dmabufd_client.Client, LOAD_FILE)


@dataclass
class Daemon:
    runtime_dir: Path
    pid: int | None  # None when the pid is unknown (another user's daemon)
    private: bool


def daemon_pid(runtime_dir: Path) -> int | None:
    """The pid a running daemon wrote into its runtime dir's lock file."""
    try:
        pid = int((runtime_dir / LOCK_FILE_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if os.path.exists(f"/proc/{pid}/status") else None


@contextlib.contextmanager
def running_daemon(runtime_dir: Path | None) -> Iterator[Daemon]:
    """The daemon at `runtime_dir`, or a private one started here (python -m dmabufd) and
    stopped at the end."""
    if runtime_dir is not None:
        yield Daemon(runtime_dir, daemon_pid(runtime_dir), private=False)
        return
    with tempfile.TemporaryDirectory(prefix="dmabufd-bench-rt-") as tmp:
        runtime = Path(tmp) / "rt"
        log_path = Path(tmp) / "dmabufd.log"
        command = [sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime), "--log-level", "warning"]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, runtime, log_path)
            yield Daemon(runtime, process.pid, private=True)
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], runtime: Path, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = "sockets not there yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dmabufd exited with {process.returncode}: {log_path.read_text(errors='replace')}")
        try:
            with dmabufd_client.connect(runtime, timeout_s=2.0) as client:
                if client.health():
                    return
        except (dmabufd_client.DmabufdError, OSError) as error:
            last_error = str(error)
        time.sleep(0.05)
    raise RuntimeError(f"dmabufd did not become ready in {START_TIMEOUT_S:.0f} s ({last_error})")
