"""Starting, refusing to start twice, and stopping cleanly."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import DaemonFactory, stop_daemon


def test_second_daemon_on_the_same_runtime_dir_refuses(daemon_factory: DaemonFactory) -> None:
    first = daemon_factory()
    sockets_before = sorted(p.name for p in first.runtime_dir.iterdir())
    second = subprocess.run(
        [sys.executable, "-m", "dmabufd", "--runtime-dir", str(first.runtime_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 1
    assert f"another dmabufd (pid {first.pid}) is running" in second.stderr
    assert sorted(p.name for p in first.runtime_dir.iterdir()) == sockets_before
    with first.connect() as client:  # the first one still serves
        client.allocate(4096).close()


def test_sigterm_removes_sockets_and_lock(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory()
    client = daemon.connect()
    client.allocate(4096)
    assert stop_daemon(daemon) == 0
    assert list(daemon.runtime_dir.iterdir()) == []
    assert "dmabufd stopped" in daemon.log()
    client.close()


def test_runtime_dir_from_environment(daemon_factory: DaemonFactory, tmp_path: object) -> None:
    import os
    from pathlib import Path

    runtime = Path(str(tmp_path)) / "from-env"
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(runtime)}
    process = subprocess.Popen([sys.executable, "-m", "dmabufd"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if "dmabufd ready" in line:
                break
        assert (runtime / "dmabufd.sock").exists()
    finally:
        process.terminate()
        process.wait(timeout=15)
    assert process.returncode == 0
