"""Observability: `--log-format json` (one object per line, session events
with their session, pid and uid) and the opt-in Prometheus metrics, scraped
after a real workload."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dmabufd_client
from dmabufd.config import parse_config
from dmabufd.errors import ConfigError
from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, FD_SOCKET_NAME
from tests.conftest import START_TIMEOUT_S, RunningDaemon, stop_daemon

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(tmp_path: Path, config_text: str, *extra: str) -> RunningDaemon:
    """A daemon with extra command-line arguments (conftest's starter passes
    fixed ones), once it has logged that it is ready (metrics included)."""
    runtime_dir = tmp_path / "rt"
    config_path = tmp_path / "dmabufd.toml"
    config_path.write_text(config_text)
    log_path = tmp_path / "dmabufd.log"
    args = [sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime_dir), "--config", str(config_path), *extra]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    daemon = RunningDaemon(process, runtime_dir, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (
        (runtime_dir / CONTROL_SOCKET_NAME).exists()
        and (runtime_dir / FD_SOCKET_NAME).exists()
        and "dmabufd ready" in daemon.log()
    ):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"dmabufd did not start:\n{daemon.log()}")
        time.sleep(0.05)
    return daemon


@pytest.fixture
def stopping() -> Iterator[list[RunningDaemon]]:
    """Daemons to stop (cleanly) at the end of the test."""
    started: list[RunningDaemon] = []
    yield started
    for daemon in started:
        assert stop_daemon(daemon) == 0, daemon.log()


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples(reply.read().decode())


def test_metrics_and_json_log_after_a_workload(tmp_path: Path, stopping: list[RunningDaemon]) -> None:
    port = free_port()
    daemon = start(
        tmp_path,
        f'[quota.default]\nmax_bytes = "1M"\n[metrics]\nlisten = "127.0.0.1:{port}"\n',
        "--log-format",
        "json",
        "--log-level",
        "debug",
    )
    stopping.append(daemon)
    uid = str(os.getuid())
    model = tmp_path / "weights.bin"
    model.write_bytes(os.urandom(192 << 10))
    with daemon.connect() as client:
        session_id = client.session_id
        kept = client.allocate(64 << 10)
        with client.allocate(32 << 10):
            pass  # allocated, then released
        with pytest.raises(dmabufd_client.errors.QuotaExceeded):
            client.allocate(2 << 20)
        with pytest.raises(dmabufd_client.errors.HeapNotFound):
            client.allocate(4096, heap="no-such-heap")
        loaded = client.load_file(model, method="sendfile")
        held = scrape(port)
        loaded.close()
        kept.close()
    # The daemon ends a session as it sees the client's socket close: a
    # moment after the client has gone.
    after = scrape(port)
    deadline = time.monotonic() + 5
    while value(after, "dmabufd_sessions_closed_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = scrape(port)

    # While the session held its buffers: 64 KiB allocated, 192 KiB loaded.
    assert value(held, "dmabufd_buffers", heap="memfd") == 1 + len(loaded.buffers)
    assert value(held, "dmabufd_buffer_bytes", heap="memfd") == (64 << 10) + (192 << 10)
    assert value(held, "dmabufd_uid_buffers", uid=uid) == 1 + len(loaded.buffers)
    assert value(held, "dmabufd_uid_buffer_bytes", uid=uid) == (64 << 10) + (192 << 10)
    assert value(held, "dmabufd_uid_charged_bytes", uid=uid) >= (64 << 10) + (192 << 10)
    assert value(held, "dmabufd_uid_quota_bytes", uid=uid) == 1 << 20
    assert value(held, "dmabufd_sessions", uid=uid) == 1
    assert value(held, "dmabufd_heap", heap="memfd", backend="memfd") == 1
    # Events, counted once each.
    assert value(after, "dmabufd_allocations_total") == 2 + len(loaded.buffers)
    assert value(after, "dmabufd_releases_total") == 2 + len(loaded.buffers)
    assert value(after, "dmabufd_errors_total", reason="QUOTA_EXCEEDED", code="RESOURCE_EXHAUSTED") == 1
    assert value(after, "dmabufd_errors_total", reason="HEAP_NOT_FOUND", code="NOT_FOUND") == 1
    assert value(after, "dmabufd_quota_denials_total", uid=uid) == 1
    assert value(after, "dmabufd_denials_total") == 1
    assert value(after, "dmabufd_loads_total", method="sendfile") == 1
    assert value(after, "dmabufd_load_bytes_total", method="sendfile") == 192 << 10
    seconds = value(after, "dmabufd_load_seconds_total", method="sendfile")
    assert 0 < seconds == pytest.approx(loaded.stats.wall_seconds, abs=1e-6)
    assert value(after, "dmabufd_sessions_opened_total") == value(after, "dmabufd_sessions_closed_total") == 1
    assert value(after, "dmabufd_buffers", heap="memfd") == 0
    assert value(after, "process_open_fds") > 0, "the process collector is there"

    assert stop_daemon(daemon) == 0
    lines = daemon.log().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= entry.keys() for entry in entries)
    events = {entry.get("event"): entry for entry in entries if entry.get("session") == session_id}
    for event in ("session-opened", "session-closed"):
        assert events[event]["pid"] == os.getpid(), events[event]
        assert events[event]["uid"] == os.getuid()
    assert events["session-closed"]["duration_s"] > 0
    allocated = [entry for entry in entries if entry.get("event") == "allocated"]
    assert [entry["bytes"] for entry in allocated] == [64 << 10, 32 << 10]
    assert allocated[0]["buffer_ids"] == [kept.id]
    (load,) = [entry for entry in entries if entry.get("event") == "loaded"]
    assert load["bytes"] == 192 << 10
    assert load["buffer_ids"] == [buffer.id for buffer in loaded.buffers]
    assert load["method"] == "sendfile"
    assert load["duration_s"] >= 0
    assert "Traceback" not in daemon.log()


def test_the_readable_log_stays_the_default(tmp_path: Path, stopping: list[RunningDaemon]) -> None:
    daemon = start(tmp_path, "")
    stopping.append(daemon)
    with daemon.connect():
        pass
    stop_daemon(daemon)
    opened = next(line for line in daemon.log().splitlines() if " opened: pid " in line)
    assert " dmabufd INFO dmabufd.sessions.session: session 1 opened: pid " in opened
    with pytest.raises(json.JSONDecodeError):
        json.loads(opened)


def test_metrics_on_a_unix_socket(tmp_path: Path, stopping: list[RunningDaemon]) -> None:
    daemon = start(tmp_path, '[metrics]\nunix = "metrics.sock"\n')
    stopping.append(daemon)
    path = daemon.runtime_dir / "metrics.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "only root scrapes by default"
    with daemon.connect(), daemon.connect(), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    assert value(samples(body.decode()), "dmabufd_sessions", uid=str(os.getuid())) == 2
    stop_daemon(daemon)
    assert not path.exists(), "the daemon removes its metrics socket"


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9464", "192.168.1.10:9464", "[::]:9464", "localhost:9464", "127.0.0.1", "127.0.0.1:0"]
)
def test_metrics_listen_only_on_loopback(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse_config({"metrics": {"listen": listen}})


def test_metrics_config() -> None:
    assert not parse_config({}).metrics.enabled, "metrics are off by default"
    assert parse_config({"metrics": {"listen": "[::1]:9464"}}).metrics.listen == ("::1", 9464)
    assert parse_config({"metrics": {"listen": "127.0.0.1:9464"}}).metrics.listen == ("127.0.0.1", 9464)
    with pytest.raises(ConfigError, match="exclusive"):
        parse_config({"metrics": {"listen": "127.0.0.1:9464", "unix": "/run/m.sock"}})
    with pytest.raises(ConfigError, match="unknown"):
        parse_config({"metrics": {"port": 9464}})
