"""The ninth row: the same file loaded through a running dmabufd with the Python client.

Until the client has load_file the row is skipped with a reason. The call:
client.load_file(fd, offset=0, length=..., heap="", usage=..., name=..., method="auto",
verify=False, max_buffer_bytes=CHUNK) returns an object with .buffers (Buffer objects), .close(),
and the method, bytes, wall and daemon CPU seconds (see describe()).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import dmabufd_client
from dmabufd_client import Buffer
from dmabufd_common.fdwire import LOCK_FILE_NAME

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 1800.0  # a 1 GiB load under QEMU TCG takes minutes
LOAD_FILE = "load_file"


@dataclass
class Placement:
    """`length` file bytes from `file_offset` sit in `buffer` at `buffer_offset`."""

    buffer: Buffer
    buffer_offset: int
    file_offset: int
    length: int


@dataclass
class Outcome:
    """What a load_file result says, whichever of its shapes the client returns: the planned
    flat one (.method, .bytes, .wall_seconds, .cpu_seconds) or with them under .stats, and
    with .segments (buffer_id, buffer_offset, file_offset, length) or buffers in file order."""

    method: str
    bytes: int
    wall_seconds: float
    cpu_seconds: float
    buffers: list[Buffer]
    placements: list[Placement]
    stats: dict[str, Any]  # every plain field the result carries (e.g. parallelism), for the JSON


def _stat(loaded: Any, name: str) -> Any:
    stats = getattr(loaded, "stats", None)
    if stats is not None and hasattr(stats, name):
        return getattr(stats, name)
    return getattr(loaded, name)


def describe(loaded: Any, size: int) -> Outcome:
    buffers: list[Buffer] = list(loaded.buffers)
    placements: list[Placement] = []
    segments = getattr(loaded, "segments", None)
    if segments:
        by_id = {buffer.id: buffer for buffer in buffers}
        placements = [
            Placement(by_id[s.buffer_id], s.buffer_offset, s.file_offset, s.length)
            for s in sorted(segments, key=lambda s: s.file_offset)
        ]
    else:
        offset = 0
        for buffer in buffers:
            length = min(buffer.size, size - offset)
            if length > 0:
                placements.append(Placement(buffer, 0, offset, length))
                offset += length
    return Outcome(
        method=str(_stat(loaded, "method")),
        bytes=int(_stat(loaded, "bytes")),
        wall_seconds=float(_stat(loaded, "wall_seconds")),
        cpu_seconds=float(_stat(loaded, "cpu_seconds")),
        buffers=buffers,
        placements=placements,
        stats={
            key: value
            for key, value in getattr(getattr(loaded, "stats", loaded), "__dict__", {}).items()
            if isinstance(value, str | int | float | bool)
        },
    )


LoadFile = Callable[..., Any]


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
def running_daemon(runtime_dir: Path | None, config: Path | None = None) -> Iterator[Daemon]:
    """The daemon at `runtime_dir`, or a private one started here (python -m dmabufd, with
    `config` if given) and stopped at the end."""
    if runtime_dir is not None:
        yield Daemon(runtime_dir, daemon_pid(runtime_dir), private=False)
        return
    with tempfile.TemporaryDirectory(prefix="dmabufd-bench-rt-") as tmp:
        runtime = Path(tmp) / "rt"
        log_path = Path(tmp) / "dmabufd.log"
        command = [sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime), "--log-level", "warning"]
        if config is not None:
            command += ["--config", str(config)]
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
