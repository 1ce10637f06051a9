"""The README's client example runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import RunningDaemon

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_client_example_runs(daemon: RunningDaemon) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    result = subprocess.run(
        [sys.executable, "-c", example], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    with daemon.connect() as client:
        stats = client.stats()
        assert stats.allocations == 8
        assert stats.releases == 8
