"""Boot the product's kernels under QEMU and run tests/vm/guest inside each (marker `vm`).

The kernels are built (or taken from the cache) by tools/vm/dmabufd_vm.py: stock first, then the
patched one incrementally. If a VM cannot run here the tests are skipped locally with the reason,
and FAIL when env CI is set (CI must not pass by skipping them).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tools.vm import dmabufd_vm as vm  # noqa: E402

pytestmark = pytest.mark.vm

GUEST_TIMEOUT = float(os.environ.get("DMABUFD_VM_SUITE_TIMEOUT", "2400"))


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
        return {v: reason for v in vm.VARIANTS}
    try:
        if os.geteuid() == 0:
            vm.ensure_dependencies(sys.stderr)
        inputs = vm.resolve_inputs()
    except vm.VMError as e:
        return {v: str(e) for v in vm.VARIANTS}
    for variant in vm.VARIANTS:
        if variant == "patched" and not inputs.patches:
            out[variant] = f"no kernel patches in {vm.default_patch_dir()}"
            continue
        try:
            out[variant] = vm.build(variant, inputs=inputs, install=False)
        except vm.VMError as e:
            out[variant] = f"{variant} kernel build failed: {e}"
    return out


# A cold build of both kernels happens in the first test's setup: far beyond the default timeout.
@pytest.mark.timeout(5400)
@pytest.mark.parametrize("variant", vm.VARIANTS)
def test_guest_suite(variant: vm.Variant, kernels: dict[str, vm.Artifact | str], tmp_path: Path) -> None:
    art = kernels[variant]
    if isinstance(art, str):
        _unavailable(art)
    console = tmp_path / f"console-{variant}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "tests/vm/guest", "-p", "no:cacheprovider"]
    result = vm.run(
        variant,
        cmd,
        cwd=REPO,
        mem="4G",
        disk_mb=2048,
        timeout=GUEST_TIMEOUT,
        # (two vivid instances, the second multi-planar, are on every guest's command line)
        console=None,
        console_log=console,
        build_if_missing=False,
    )
    summary = result.summary()
    print(summary)
    print(result.output[-20000:])
    assert not result.timed_out, f"{summary}\n{result.output[-20000:]}"
    assert result.returncode == 0, f"{summary}\n{result.output[-20000:]}"
    assert " passed" in result.output, result.output[-5000:]
