"""bench.load_modes on a tiny file (8 MiB in 4 x 2 MiB buffers): the JSON shape, and every mode
either ran with verified data or was skipped with a reason. A smoke test, not a timed assertion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import dmabufd_client
from bench import load_modes
from tests.conftest import RunningDaemon

REPO = Path(__file__).resolve().parents[2]
SIZE = 8 << 20
CHUNK = 2 << 20
ARGS = ("--size", "8M", "--chunk", "2M", "--verify", "--json")
ROW_KEYS = {"mode", "key", "label", "status", "reason", "creat_ms", "close_ms", "io_ms", "mb_s", "io_pct", "cpu_ms"}


def check_report(report: dict[str, Any], modes: list[int]) -> dict[int, dict[str, Any]]:
    assert report["tool"] == "bench.load_modes"
    assert report["file"]["size"] == SIZE
    assert report["chunk"] == CHUNK
    assert report["buffers"] == SIZE // CHUNK
    assert report["cache_drop"]
    rows = {row["mode"]: row for row in report["modes"]}
    assert sorted(rows) == modes
    for number, row in rows.items():
        assert set(row) >= ROW_KEYS, row
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"], row
            assert row["runs"] == []
            continue
        assert row["verified"] is True, row
        assert min(row["io_ms"], row["mb_s"], row["io_pct"]) > 0, row
        assert min(row["close_ms"], row["cpu_ms"]) >= 0, row
        if number != 9:
            assert row["creat_ms"] >= 0
        for run in row["runs"]:
            assert run["bytes"] == SIZE
            assert run["buffers"] == SIZE // CHUNK
            assert run["samples_checked"] >= SIZE // CHUNK
            assert run["sha256_ok"] is True
    return rows


def test_all_modes_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.load_modes", *ARGS, "--dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    rows = check_report(json.loads(result.stdout), list(range(1, 10)))
    # memfd + O_DIRECT runs on every kernel; it is the I/O% reference.
    assert rows[1]["status"] == "ok"
    assert rows[1]["io_pct"] == pytest.approx(100)
    if not hasattr(dmabufd_client.Client, "load_file"):
        assert rows[9]["reason"] == "dmabufd has no load_file yet"
    assert list(tmp_path.iterdir()) == []  # the temporary test file is gone


def test_rejects_unaligned_chunk() -> None:
    with pytest.raises(SystemExit):
        load_modes.parser().parse_args(["--chunk", "1000"])


@dataclass
class FakeLoaded:
    """The planned shape of Client.load_file's result."""

    buffers: list[dmabufd_client.Buffer]
    method: str = "client-side-read"
    bytes: int = 0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()


def fake_load_file(
    self: dmabufd_client.Client,
    fd_or_path: int | str,
    *,
    offset: int = 0,
    length: int = 0,
    heap: str = "",
    usage: str = "",
    name: str = "",
    method: str = "auto",
    verify: bool = False,
    max_buffer_bytes: int = 0,
) -> FakeLoaded:
    """Stands in for load_file until it exists: allocate, then read into each mapping."""
    assert isinstance(fd_or_path, int)
    assert min(max_buffer_bytes, length) > 0
    started = time.perf_counter()
    loaded = FakeLoaded([])
    done = 0
    while done < length:
        size = min(max_buffer_bytes, length - done)
        buffer = self.allocate(size, heap=heap, usage=usage, name=name)
        loaded.buffers.append(buffer)
        with buffer.map(dmabufd_client.Access.WRITE) as mapping:
            assert os.preadv(fd_or_path, [mapping.memoryview[:size]], offset + done) == size
        done += size
    loaded.bytes = done
    loaded.wall_seconds = time.perf_counter() - started
    return loaded


def test_dmabufd_row(daemon: RunningDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """Row 9 against a running daemon, through load_file (a client-side stand-in until it exists)."""
    if not hasattr(dmabufd_client.Client, "load_file"):
        monkeypatch.setattr(dmabufd_client.Client, "load_file", fake_load_file, raising=False)
    argv = [*ARGS, "--dir", str(tmp_path), "--modes", "1,9"]
    code = load_modes.main([*argv, "--runtime-dir", str(daemon.runtime_dir)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    rows = check_report(report, [1, 9])
    row = rows[9]
    assert row["status"] == "ok", row
    run = row["runs"][0]
    assert run["extra"]["rss"]["pid"] == daemon.pid
    assert run["extra"]["rss"]["samples"] >= 1
    summary = report["summary"]["dmabufd"]
    assert summary["ratio_to_best_raw_io"] > 0
    assert summary["rss_growth_bytes"] is not None
