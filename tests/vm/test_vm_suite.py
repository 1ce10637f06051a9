"""Boot the product's kernels under QEMU and run tests/vm/guest inside each (marker `vm`).

The kernels are built (or taken from the cache) by tools/vm/dmabufd_vm.py: stock first, then
patched and debug (lockdep + KASAN), each from a copy of the stock tree. Every guest has 2 CPUs,
the ext4 scratch disk and an f2fs disk. A run fails on a non-zero exit and on any kernel report
(lockdep, KASAN, WARNING, BUG ...) in the guest's dmesg, whatever the variant.

If a VM cannot run here the tests are skipped locally with the reason, and FAIL when env CI is
set (CI must not pass by skipping them).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.native_build import NativeBuildError, build_native  # noqa: E402
from tools.vm import dmabufd_vm as vm  # noqa: E402

pytestmark = pytest.mark.vm

GUEST_TIMEOUT = float(os.environ.get("DMABUFD_VM_SUITE_TIMEOUT", "2400"))
# The debug subset took 30 min on a shared machine (tools/vm/README.md); its guest may take
# this much longer than GUEST_TIMEOUT, and stays under the test's own 5400 s.
DEBUG_TIMEOUT_FACTOR = 1.5
GUEST_MEM = "4G"
SCRATCH_MB = 2048
F2FS_DISK = vm.DiskSpec("f2fs", 2048, "f2fs")
GUEST_SUITE = ["tests/vm/guest"]
# What the debug kernel runs. Python runs about 3x slower there than on the product kernel
# (lockdep and KASAN under TCG) and every daemon start takes ~1-2 min, so the guest suite does
# not fit CI's 90 minutes (measured: tools/vm/README.md). It runs the kernel's own paths whole
# (selftests, copy_file_range, loading through the daemon) and a few daemon and camera tests
# that drive the same kernel paths from other processes (fd passing, SIGKILL cleanup, vivid
# importing our dma-bufs). A renamed test makes the run fail ("not found"), never skip.
DEBUG_SUITE = [
    "tests/vm/guest/test_guest_kselftests.py",
    "tests/vm/guest/test_guest_copy_file_range.py",
    "tests/vm/guest/test_loading_on_vm.py",
    "tests/vm/guest/test_service_on_vm.py::test_real_heaps_are_discovered",
    "tests/vm/guest/test_service_on_vm.py::test_bytes_written_by_one_process_are_read_by_another",
    "tests/vm/guest/test_service_on_vm.py::test_sigkill_releases_heap_buffers",
    "tests/vm/guest/test_camera_on_vm.py::test_dmabuf_frames_equal_mmap_frames[NM12-udmabuf]",
    "tests/vm/guest/test_camera_on_vm.py::test_camera_client_with_consumer[NM12-system]",
]
# What the stock kernel runs: what behaves differently without the series (the selftests, which
# skip the direct I/O binary there; copy_file_range's refusals; the daemon's fallback methods and
# its heap choice by speed; a dma_heap.json route to a heap loaded by a fallback). The upstream
# heap and udmabuf checks and the daemon, camera and native client suites exercise drivers the
# series changes: they run on the patched kernel, where a regression of the series would show.
# (Measured: the stock guest took 16.8 min with everything, see tools/vm/README.md.)
STOCK_SUITE = [
    "tests/vm/guest/test_guest_kselftests.py",
    "tests/vm/guest/test_guest_copy_file_range.py",
    "tests/vm/guest/test_loading_on_vm.py",
    "tests/vm/guest/test_dma_heap_json_on_vm.py",
]
# ... less the 256 MiB transfers: the same code paths as the smaller sizes, ~6 of its minutes.
DEBUG_DESELECT = "not 256M and not 268435456"
# pytest-timeout's per-test default (pyproject.toml: 300 s), scaled for the debug kernel.
TEST_TIMEOUT_S = 300


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"VM tests cannot run: {reason}", pytrace=False)
    pytest.skip(f"VM tests cannot run: {reason}")


@pytest.fixture(scope="session")
def kernels() -> dict[str, vm.Artifact | str]:
    """variant -> built Artifact, or the reason it is not available."""
    out: dict[str, vm.Artifact | str] = {}
    if shutil.which("qemu-system-x86_64") is None and os.geteuid() != 0:
        reason = "qemu-system-x86_64 is not installed and not root (apt-get install qemu-system-x86)"
        return dict.fromkeys(vm.VARIANTS, reason)
    try:
        if os.geteuid() == 0:
            vm.ensure_dependencies(sys.stderr)
        inputs = vm.resolve_inputs()
    except vm.VMError as e:
        return dict.fromkeys(vm.VARIANTS, str(e))
    for name, variant in vm.BUILTIN_VARIANTS.items():
        if variant.patched and not inputs.patches:
            out[name] = f"no kernel patches in {vm.default_patch_dir()}"
            continue
        try:
            out[name] = vm.build(variant, inputs=inputs, install=False)
        except vm.VMError as e:
            out[name] = f"{name} kernel build failed: {e}"
    return out


def _native_build_env() -> dict[str, str]:
    """Build the native C++ client on the host (tests/native_build.py) before the guests run; the
    guest tests find the build through DMABUFD_NATIVE_BUILD. If it cannot be built, the guests
    run without it and tests/vm/guest/test_native_on_vm.py says so (and fails under CI)."""
    try:
        out = build_native(REPO).resolve()
    except NativeBuildError as e:
        print(f"native client not built, the guests run without it: {e}", file=sys.stderr)
        return {}
    hidden = vm._hidden_in_guest(out)
    if hidden:
        pytest.fail(f"the native build {out} is under {hidden}, which the guest cannot see", pytrace=False)
    return {"DMABUFD_NATIVE_BUILD": str(out)}


@pytest.fixture(scope="session")
def native_env() -> dict[str, str]:
    return _native_build_env()


def _command(variant: str) -> list[str]:
    scale = vm.BUILTIN_VARIANTS[variant].timeout_scale
    timeout = [f"--timeout={TEST_TIMEOUT_S * scale:.0f}"] if scale > 1 else []
    select = {"debug": [*DEBUG_SUITE, "-k", DEBUG_DESELECT], "stock": STOCK_SUITE}.get(variant, GUEST_SUITE)
    # --durations: where a guest's minutes go shows in every run's output (CI's 90 minutes are tight).
    return [sys.executable, "-m", "pytest", "-q", "-rs", "--durations=15", *timeout, *select, "-p", "no:cacheprovider"]


def _failure(result: vm.RunResult) -> str | None:
    problems = []
    if result.init_never_started:
        killed = f" ({result.stalled_boots_text()})" if result.stalled_boots else ""
        problems.append(f"the guest's init never started{killed}")
    if result.timed_out:
        problems.append("the guest timed out")
    elif result.returncode != 0:
        problems.append(f"the guest command exited {result.returncode}")
    elif " passed" not in result.output:
        problems.append("the guest suite passed nothing")
    if result.reports:
        problems.append(result.reports_text())
    # A boot killed before init and booted again passes only when its kernel reports (an early
    # boot flake of TCG) name nothing of the dma-buf code our series touches.
    for boot in result.stalled_boots:
        if boot.touches_our_code():
            problems.append(f"a boot killed before init reported on dma-buf code:\n{vm.format_reports(boot.reports)}")
    if not problems:
        return None
    return "\n".join([result.summary(), *problems, "guest output (tail):", result.output[-20000:]])


# A cold build of the kernels happens in the first test's setup: far beyond the default timeout.
@pytest.mark.timeout(5400)
@pytest.mark.parametrize("variant", vm.VARIANTS)
def test_guest_suite(
    variant: str, kernels: Mapping[str, vm.Artifact | str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    art = kernels[variant]
    if isinstance(art, str):
        _unavailable(art)
    # only once a guest can run: the native build is minutes of C++ on a fresh machine
    native_env: Mapping[str, str] = request.getfixturevalue("native_env")
    timeout = GUEST_TIMEOUT * (DEBUG_TIMEOUT_FACTOR if variant == "debug" else 1.0)
    result = vm.run(
        variant,
        _command(variant),
        cwd=REPO,
        mem=GUEST_MEM,
        smp=2,
        disk_mb=SCRATCH_MB,
        disks=[F2FS_DISK],
        timeout=timeout,
        env=native_env,
        # (two vivid instances, the second multi-planar, are on every guest's command line)
        console=None,
        console_log=tmp_path / f"console-{variant}.log",
        build_if_missing=False,
    )
    print(result.summary())
    print(result.reports_text())
    print(result.stalled_boots_reports())
    print(result.output[-20000:])
    failure = _failure(result)
    if failure:
        pytest.fail(failure, pytrace=False)
