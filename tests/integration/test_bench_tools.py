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


def test_bench_service_refuses_cpus_that_are_not_there() -> None:
    absent = str(max(os.sched_getaffinity(0)) + 1)
    result = run_tool("tools/bench_service.py", "--daemon-cpus", absent, timeout=60)
    assert result.returncode == 2
    assert "--daemon-cpus: " in result.stderr
    assert "usable CPUs: " in result.stderr
