"""The native C++ client (clients/native) against a real daemon.

Builds it with CMake into build/native (tests/native_build.py; the first
build takes minutes, later ones only recompile what changed), then runs
its ctest conformance suite against a daemon started by daemon_factory,
and its buffer-sharing example. On this machine the daemon has the memfd
heap only; tests/vm/guest/test_native_on_vm.py runs the same binaries
against the system DMA heap and udmabuf.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory
from tests.native_build import build_native, run_ctest

REPO = Path(__file__).resolve().parents[2]
# A quota below any heap's largest buffer, so the suite can hit it on purpose.
QUOTA_CONFIG = '[quota.default]\nmax_bytes = "256M"\n'
# The suite has more than this; fewer means tests went missing.
MIN_TESTS = 40
# A cold build of grpc++ code on two busy cores takes several minutes.
BUILD_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def native_build() -> Path:
    return build_native(REPO)


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_conformance_suite_passes(native_build: Path, daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory(QUOTA_CONFIG)
    result = run_ctest(native_build, daemon.runtime_dir, scratch=tmp_path / "ctest", expect_heaps=("memfd",))
    print(f"\nnative conformance suite: {result.passed} passed, {result.failed} failed, {result.total} in all")
    assert result.total >= MIN_TESTS, result.output[-20000:]
    assert result.failed == 0, result.output[-20000:]
    assert result.returncode == 0, result.output[-20000:]
    assert result.passed == result.total


@pytest.mark.timeout(BUILD_TIMEOUT_S)
@pytest.mark.parametrize("via", ["grant", "fd"])
def test_share_example(native_build: Path, daemon_factory: DaemonFactory, via: str) -> None:
    daemon = daemon_factory()
    example = native_build / "examples" / "dmabufd_share_buffer"
    done = subprocess.run(
        [str(example), "--runtime-dir", str(daemon.runtime_dir), "--size", "1048576", "--via", via],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 1048576 bytes as written" in done.stdout
    assert done.stdout.rstrip().endswith("shared: OK")
