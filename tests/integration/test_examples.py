"""The shipped examples run against a real daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import RunningDaemon

EXAMPLES = Path(__file__).resolve().parents[2] / "clients" / "examples"


def test_producer_consumer(daemon: RunningDaemon) -> None:
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "producer_consumer.py"), "--size", "256K"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("heap memfd: producer")
    assert result.stdout.rstrip().endswith(": same")


def test_watch_heaps_example(daemon: RunningDaemon) -> None:
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "watch_heaps.py")], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().split()[:2] == ["added", "memfd"]
        assert process.stdout.readline().startswith("-- the heaps above exist now")
    finally:
        process.terminate()
        process.wait(timeout=15)
