"""dmabufctl, as a script would use it (--json) and as a person would."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import RunningDaemon


def ctl(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmabufd_client.ctl", "--runtime-dir", str(daemon.runtime_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ctl_json(daemon: RunningDaemon, *args: str) -> Any:
    result = ctl(daemon, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_heaps_json(daemon: RunningDaemon) -> None:
    heaps = ctl_json(daemon, "heaps")
    assert [h["name"] for h in heaps["heaps"]] == ["memfd"]
    assert heaps["heaps"][0]["backend"] == "memfd"
    assert heaps["usage_routes"]["camera"] == ["cma", "system", "udmabuf", "memfd"]


def test_alloc_json_with_suffix_sizes(daemon: RunningDaemon) -> None:
    result = ctl_json(daemon, "alloc", "--size", "4M", "--count", "3", "--name", "cli")
    assert [b["size"] for b in result["buffers"]] == [4 << 20] * 3
    assert all(b["kernel_name"].endswith(":cli") for b in result["buffers"])
    assert result["seconds"] > 0


def test_stats_json_counts_what_alloc_did(daemon: RunningDaemon) -> None:
    ctl_json(daemon, "alloc", "--size", "64K", "--count", "2")
    stats = ctl_json(daemon, "stats", "--proc")
    assert int(stats["allocations"]) == 2
    assert int(stats["releases"]) == 2
    assert int(stats["total_buffers"]) == 0


def test_watch_json_lists_current_heaps(daemon: RunningDaemon) -> None:
    result = ctl(daemon, "--json", "watch", "--timeout", "0.5", "--count", "1")
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[0])
    assert first == {"event": "added", "heap": first["heap"]}
    assert first["heap"]["name"] == "memfd"


def test_errors_are_readable_and_machine_readable(daemon: RunningDaemon) -> None:
    human = ctl(daemon, "alloc", "--size", "4K", "--heap", "nope")
    assert human.returncode == 1
    assert "NOT_FOUND" in human.stderr
    assert "no heap named 'nope'" in human.stderr
    machine = ctl(daemon, "--json", "alloc", "--size", "4K", "--heap", "nope")
    assert json.loads(machine.stdout)["error"] == "NOT_FOUND"


def test_bad_size_is_a_usage_error(daemon: RunningDaemon) -> None:
    result = ctl(daemon, "alloc", "--size", "four megabytes")
    assert result.returncode == 2
    assert "not a size" in result.stderr


def test_tables_for_people(daemon: RunningDaemon) -> None:
    result = ctl(daemon, "stats")
    assert result.returncode == 0, result.stderr
    assert "clients" in result.stdout
    assert "total" in result.stdout


def test_daemon_not_running(tmp_path: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dmabufd_client.ctl", "--runtime-dir", str(tmp_path), "heaps"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr or "cannot reach" in result.stderr
