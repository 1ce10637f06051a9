"""The native C++ client on the product's kernel: its conformance suite
against the system DMA heap and udmabuf (DMA_BUF_IOCTL_SYNC on real
dma-bufs), its sharing example, and its V4L2 example capturing from vivid
into dmabufd buffers. Runs inside the VM only.

Nothing is built here (the checkout is read-only in the guest): the host
builds clients/native (tests/native_build.py) and passes the build
directory as DMABUFD_NATIVE_BUILD. Without it the tests fail when CI is
set and skip otherwise, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dmabufd_camera import v4l2
from tests.conftest import DaemonFactory, RunningDaemon
from tests.native_build import run_ctest

# A quota below any heap's largest buffer, so the suite can hit it on purpose.
QUOTA_CONFIG = '[quota.default]\nmax_bytes = "256M"\n'
REAL_HEAPS = ("system", "udmabuf")
# The suite has more than this; fewer means tests went missing.
MIN_TESTS = 40
# The guest is emulated (TCG): everything takes many times longer.
CTEST_TIMEOUT_S = 1800
EXAMPLE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def native_build() -> Path:
    configured = os.environ.get("DMABUFD_NATIVE_BUILD", "")
    if not configured:
        reason = (
            "DMABUFD_NATIVE_BUILD is not set: build clients/native on the host "
            "(tests.native_build.build_native) and pass its build directory into the guest"
        )
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    build = Path(configured)
    for binary in (
        "tests/dmabufd_conformance",
        "tests/dmabufd_test_peer",
        "examples/dmabufd_v4l2_capture",
        "examples/dmabufd_share_buffer",
    ):
        if not os.access(build / binary, os.X_OK):
            pytest.fail(f"DMABUFD_NATIVE_BUILD={build} has no {binary}: is it a built clients/native?", pytrace=False)
    return build


@pytest.fixture(scope="module")
def vivid() -> dict[str, str]:
    """'single' and 'multi' -> vivid's capture node of that API (the VM boots
    two vivid instances, the second multi-planar)."""
    nodes: dict[str, str] = {}
    for path, caps in v4l2.find_capture_devices("vivid"):
        nodes.setdefault("multi" if caps.multi_planar else "single", path)
    if set(nodes) != {"single", "multi"}:
        pytest.fail(f"need a single- and a multi-planar vivid capture node, found {nodes}")
    return nodes


def test_real_heaps_are_there() -> None:
    assert Path("/dev/dma_heap/system").exists(), "the product kernel has the system DMA heap"
    assert Path("/dev/udmabuf").exists(), "the product kernel has udmabuf"


def test_conformance_suite_on_real_heaps(native_build: Path, daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory(QUOTA_CONFIG)
    result = run_ctest(
        native_build,
        daemon.runtime_dir,
        scratch=tmp_path / "ctest",
        expect_heaps=(*REAL_HEAPS, "memfd"),
        timeout_s=CTEST_TIMEOUT_S,
    )
    print(f"\nnative suite in the VM: {result.passed} passed, {result.failed} failed, {result.total} in all")
    assert result.total >= MIN_TESTS, result.output[-20000:]
    assert result.failed == 0, result.output[-20000:]
    assert result.returncode == 0, result.output[-20000:]


@pytest.mark.parametrize("heap", REAL_HEAPS)
@pytest.mark.parametrize("via", ["grant", "fd"])
def test_share_example_on_real_heaps(native_build: Path, daemon: RunningDaemon, heap: str, via: str) -> None:
    done = subprocess.run(
        [
            str(native_build / "examples" / "dmabufd_share_buffer"),
            "--runtime-dir",
            str(daemon.runtime_dir),
            "--heap",
            heap,
            "--via",
            via,
        ],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"in heap {heap}" in done.stdout
    assert "(sync START/END)" in done.stdout, "a dma-buf is synced around CPU access, in the receiver too"
    assert done.stdout.rstrip().endswith("shared: OK")


@pytest.mark.parametrize("heap", REAL_HEAPS)
@pytest.mark.parametrize("fourcc", ["YUYV", "NM12"])
def test_v4l2_example_frames_equal_the_mmap_capture(
    native_build: Path, daemon: RunningDaemon, vivid: dict[str, str], fourcc: str, heap: str
) -> None:
    node = vivid["multi"] if fourcc == "NM12" else vivid["single"]
    frames = 8
    done = subprocess.run(
        [
            str(native_build / "examples" / "dmabufd_v4l2_capture"),
            "--device",
            node,
            "--format",
            fourcc,
            "--size",
            "640x480",
            "--frames",
            str(frames),
            "--heap",
            heap,
            "--runtime-dir",
            str(daemon.runtime_dir),
        ],
        capture_output=True,
        text=True,
        timeout=EXAMPLE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    print(f"\n{fourcc} {heap} on {node}: {result}")
    assert result["ok"] is True
    assert result["driver"] == "vivid"
    assert result["heap"] == heap
    assert result["dma_buf"] is True
    assert result["synced"] is True
    assert result["reference"] == "mmap", "frames compared byte for byte with vivid's own MMAP capture"
    assert result["frames"] == frames
    assert result["verified"] == frames
    assert result["mismatches"] == 0
    assert result["buffers_per_frame"] == (2 if fourcc == "NM12" else 1)
