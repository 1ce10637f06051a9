"""Run the kernel selftests the harness built (env DMABUFD_VM_SELFTESTS) inside the VM.

* upstream dmabuf-heaps (dmabuf-heap) and udmabuf selftests: must pass on both kernels;
* our dmabuf_direct_io (kernel-patches/linux-6.12): must pass on the patched kernel; on the stock
  kernel it must say clearly that the kernel lacks the feature (KSFT skip, no "not ok").
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

KSFT_PASS, KSFT_FAIL, KSFT_SKIP = 0, 1, 4


def _selftests_dir(var: str = "DMABUFD_VM_SELFTESTS") -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(f"{var} is not set (the harness sets it)")
    return Path(value)


def run_tap(argv: list[str], timeout: float = 600) -> tuple[int, str]:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    print(f"$ {' '.join(argv)} -> {proc.returncode}\n{out}")
    return proc.returncode, out


def tap_failures(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if re.match(r"^\s*not ok\b", ln)]


def tap_passes(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if re.match(r"^\s*ok\b", ln) and "# SKIP" not in ln]


@contextlib.contextmanager
def hugepages(count: int) -> Iterator[int]:
    path = Path("/proc/sys/vm/nr_hugepages")
    old = int(path.read_text())
    path.write_text(f"{count}\n")
    try:
        yield int(path.read_text())
    finally:
        path.write_text(f"{old}\n")


def test_dmabuf_heaps_selftest() -> None:
    binary = _selftests_dir() / "dmabuf-heaps" / "dmabuf-heap"
    assert binary.is_file(), f"missing {binary}"
    rc, out = run_tap([str(binary)])
    assert not tap_failures(out), out
    assert rc == KSFT_PASS, out
    assert len(tap_passes(out)) >= 10, out


def test_udmabuf_selftest() -> None:
    binary = _selftests_dir() / "udmabuf" / "udmabuf"
    if not binary.is_file():
        pytest.skip(f"udmabuf selftest was not built ({binary}); see the build log")
    # Its last case maps 1024 x 2 MiB hugetlb pages: reserve them for the run.
    with hugepages(1024) as got:
        if got < 1024:
            pytest.skip(f"only {got} of 1024 huge pages available (guest memory too small)")
        rc, out = run_tap([str(binary)])
    assert not tap_failures(out), out
    assert rc == KSFT_PASS, out
    assert len(tap_passes(out)) == 6, out


def _direct_io_binary(variant: str) -> Path:
    name = "dmabuf_direct_io"
    own = _selftests_dir() / "dmabuf-heaps" / name
    if own.is_file():
        return own
    other = os.environ.get("DMABUFD_VM_PATCHED_SELFTESTS")
    if other and (Path(other) / "dmabuf-heaps" / name).is_file():
        return Path(other) / "dmabuf-heaps" / name
    if variant == "patched":
        pytest.fail(f"{own} was not built from the patched tree")
    pytest.skip("dmabuf_direct_io is built from the patched tree, which is not built yet")


@pytest.mark.timeout(1500)
def test_direct_io_selftest(vm_variant: str, scratch_dir: Path) -> None:
    binary = _direct_io_binary(vm_variant)
    workdir = scratch_dir / "kselftest-direct-io"
    workdir.mkdir(exist_ok=True)
    rc, out = run_tap([str(binary), str(workdir)], timeout=1200)
    assert not tap_failures(out), out
    if vm_variant == "patched":
        assert rc == KSFT_PASS, out
        assert tap_passes(out), out
        # the VM has everything the selftest can use (both exporters, the CMA heap, vivid for
        # EBUSY, huge pages, ext4 for alignment): no case may be skipped
        assert "# SKIP" not in out, out
        assert re.search(r"Totals: pass:\d+ fail:0 .*skip:0", out), out
    else:
        # unpatched: the selftest must notice and say so, as a skip, not pass silently
        assert rc == KSFT_SKIP, out
        assert re.search(r"(?i)(not supported|unpatched|EINVAL|Invalid argument)", out), out
