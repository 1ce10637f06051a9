"""The allocation benchmarks' scripts, end to end on small runs: each starts
its own daemons and prints what the bench README quotes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_alloc_cpu_compares_two_trees_round_by_round() -> None:
    result = run_tool("tools/bench_alloc_cpu.py", str(ROOT), "--rounds", "2", "--allocations", "70")
    assert result.returncode == 0, result.stderr
    line = r"^(base|head) \(.*\): CPU per allocation, median: event loop ([0-9.]+) us, whole daemon ([0-9.]+) us$"
    medians = re.findall(line, result.stdout, re.M)
    assert [name for name, _, _ in medians] == ["base", "head"], result.stdout
    for _, loop, whole in medians:
        assert 0 < float(loop) <= float(whole) < 100_000
    for label in ("event loop", "whole daemon"):
        ratio = rf"^head / base, {label}, per round: median [0-9.]+ \[[0-9.]+-[0-9.]+\]$"
        assert re.search(ratio, result.stdout, re.M), result.stdout


def test_bench_alloc_cpu_refuses_a_tree_without_the_service() -> None:
    result = run_tool("tools/bench_alloc_cpu.py", "/", "--rounds", "1", timeout=60)
    assert result.returncode == 2
    assert "holds no service/dmabufd" in result.stderr


def test_bench_service_runs_the_daemon_on_the_cpus_asked() -> None:
    small = ("--iterations", "20", "--clients", "2", "--seconds", "0.3")
    result = run_tool("tools/bench_service.py", "--json", "--daemon-cpus", "0", "--cpus", "0", *small)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cpus"] == [0]
    assert report["allocs_per_s_n_clients"] > 0
    # The script names its daemon to the bench, which reports the loop.
    assert report["daemon_loop_on_cpu_n_clients"] > 0
    assert report["daemon_loop_waiting_n_clients"] >= 0


def test_bench_service_starts_the_daemon_in_its_own_session_when_asked() -> None:
    small = ("--iterations", "20", "--clients", "2", "--seconds", "0.3")
    for flag, session in (("--own-session", "its own"), ("--json", "this script's")):
        result = run_tool("tools/bench_service.py", "--json", flag, *small)
        assert result.returncode == 0, result.stderr
        assert re.search(rf"^dmabufd \(pid \d+\) runs in {session} session$", result.stderr, re.M), result.stderr
        assert json.loads(result.stdout)["allocs_per_s_n_clients"] > 0


def test_bench_service_times_allocations_beside_a_load(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(os.urandom(8 << 20))
    small = ("--iterations", "30", "--clients", "2", "--seconds", "0.3")
    result = run_tool(
        "tools/bench_service.py", "--json", *small, "--beside-load", str(data), "--beside-method", "buffered-read"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["beside_load_method"] == "buffered-read"
    assert report["beside_load_loads"] >= 3
    assert 0 < report["beside_load_seconds"] < 60
    p50, p99, slowest = (report[f"beside_load_alloc_fd_{key}_us"] for key in ("p50", "p99", "max"))
    assert 0 < p50 <= p99 <= slowest
    # Without the option, the keys are there and say nothing was measured.
    plain = json.loads(run_tool("tools/bench_service.py", "--json", *small).stdout)
    assert plain["beside_load_method"] is None
    assert plain["beside_load_loads"] is None


def test_bench_service_reports_a_load_it_cannot_run() -> None:
    result = run_tool(
        "tools/bench_service.py",
        "--iterations",
        "20",
        "--clients",
        "1",
        "--seconds",
        "0.2",
        "--beside-load",
        "/nonexistent/weights.bin",
    )
    assert result.returncode != 0
    assert "--beside-load: cannot read /nonexistent/weights.bin" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_service_refuses_cpus_that_are_not_there() -> None:
    absent = str(max(os.sched_getaffinity(0)) + 1)
    result = run_tool("tools/bench_service.py", "--daemon-cpus", absent, timeout=60)
    assert result.returncode == 2
    assert "--daemon-cpus: " in result.stderr
    assert "usable CPUs: " in result.stderr
