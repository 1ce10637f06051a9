"""Run the kernel selftests the harness built (env DMABUFD_VM_SELFTESTS) inside the VM.

* upstream dmabuf-heaps (dmabuf-heap) and udmabuf selftests: must pass on both kernels;
* our dmabuf_direct_io (kernel-patches/linux-6.12): must pass on the patched and debug kernels,
  on the ext4 scratch disk and the f2fs disk, with its lockdep case run wherever the kernel has
  lockdep (the debug kernel); on
  the stock kernel it must say clearly that the kernel lacks the feature (KSFT skip, no "not ok").
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


# Cases of dmabuf_direct_io that skip by design here: Debian's system heap has no
# system-uncached heap (Android kernels do), and the lockdep sequence needs PROVE_LOCKING,
# which only a debug kernel has (it must run wherever /proc/lockdep_stats exists).
UNCACHED_SKIP = "system-uncached: EOPNOTSUPP"
LOCKDEP_SKIP = "lockdep sequence"
LOCKDEP = Path("/proc/lockdep_stats")


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


def _f2fs_workdir() -> Path:
    mount = os.environ.get("DMABUFD_VM_F2FS")
    if not mount or not Path(mount).is_dir():
        pytest.fail("no f2fs disk in this guest (DMABUFD_VM_F2FS): the suite attaches one")
    workdir = Path(mount) / f"kselftest-direct-io-{os.getpid()}"
    workdir.mkdir(exist_ok=True)
    return workdir


@pytest.mark.timeout(2400)
def test_direct_io_selftest(vm_variant: str, scratch_dir: Path) -> None:
    binary = _direct_io_binary(vm_variant)
    ext4 = scratch_dir / "kselftest-direct-io"
    ext4.mkdir(exist_ok=True)
    # every file-system case runs on the ext4 scratch disk and on the f2fs disk
    rc, out = run_tap([str(binary), str(ext4), str(_f2fs_workdir())], timeout=2100)
    assert not tap_failures(out), out
    if vm_variant == "patched":  # this kernel carries the series (the patched or a debug build)
        assert rc == KSFT_PASS, out
        assert tap_passes(out), out
        for fs in ("ext4", "f2fs"):
            assert re.search(rf"^ok \d+ system on {fs}: O_DIRECT file -> dma-buf", out, re.M), out
            assert re.search(rf"^ok \d+ udmabuf on {fs}: O_DIRECT file -> dma-buf", out, re.M), out
        # the VM has everything else the selftest can use (both exporters, the CMA heap, vivid
        # for EBUSY, huge pages, ext4 and f2fs, procfs/sysfs/debugfs): only the expected skips
        expected = (UNCACHED_SKIP,) if LOCKDEP.exists() else (UNCACHED_SKIP, LOCKDEP_SKIP)
        skipped = [ln for ln in out.splitlines() if "# SKIP" in ln]
        unexpected = [ln for ln in skipped if not any(reason in ln for reason in expected)]
        assert not unexpected, out
        if LOCKDEP.exists():
            assert len(re.findall(r"^ok \d+ .*lockdep: inode lock -> mmap_lock recorded", out, re.M)) == 4, out
    else:
        # unpatched: the selftest must notice and say so, as a skip, not pass silently
        assert rc == KSFT_SKIP, out
        assert re.search(r"(?i)(not supported|unpatched|EINVAL|Invalid argument)", out), out
