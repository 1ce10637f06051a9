"""Fixtures for tests that run inside the dmabufd VM (see tools/vm/README.md).

Every guest test is also checked for kernel reports: the new /dev/kmsg records of its setup,
call and teardown are searched for lockdep, KASAN, WARNING, BUG ... reports (the harness's
parser), and lockdep's debug_locks must not drop from 1 to 0 (lockdep prints only its first
report per boot, then turns itself off). A test that produced one fails, the report in its
output. Markers written to /dev/kmsg name the running test, so the host's end-of-run dmesg check
(tests/vm/test_vm_suite.py) can attribute reports too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

# the repo root, so guest tests import tests.vm.guest.dmabufd_vm_uapi whatever the import mode
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tools.vm import dmabufd_vm as vm

IN_VM = os.environ.get("DMABUFD_IN_VM") == "1"
LOCKDEP_STATS = Path("/proc/lockdep_stats")
# How much slower this guest's kernel runs them than the product kernel (the debug variant's
# lockdep and KASAN: 6, see tools/vm/dmabufd_vm.py).
TIMEOUT_SCALE = float(os.environ.get("DMABUFD_VM_TIMEOUT_SCALE", "1") or "1")


def _scale_daemon_start_timeout() -> None:
    """Give the daemon started by tests/conftest.py as much longer to come up as the kernel is
    slower: importing grpc and the daemon alone takes ~40 s on the debug kernel, over its 20 s."""
    if not IN_VM or TIMEOUT_SCALE <= 1:
        return
    import tests.conftest as root_conftest

    root_conftest.START_TIMEOUT_S = float(root_conftest.START_TIMEOUT_S) * TIMEOUT_SCALE


_scale_daemon_start_timeout()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_VM:
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="guest test: runs only inside the dmabufd VM (DMABUFD_IN_VM=1)")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vm_variant() -> str:
    """ "patched" when this kernel carries the series (patched, debug, ...), else "stock".

    The guest tests compare against these two: what they check is the series' behaviour, which a
    debug build of the patched kernel shares. The variant's own name is `vm_variant_name`.
    """
    if "DMABUFD_VM_PATCHED" in os.environ:
        return "patched" if os.environ["DMABUFD_VM_PATCHED"] == "1" else "stock"
    return os.environ.get("DMABUFD_VM_VARIANT", "unknown")


@pytest.fixture(scope="session")
def vm_variant_name() -> str:
    return os.environ.get("DMABUFD_VM_VARIANT", "unknown")


@pytest.fixture(scope="session")
def patched(vm_variant: str) -> bool:
    return vm_variant == "patched"


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    base = Path(os.environ.get("DMABUFD_VM_SCRATCH", "/mnt/scratch"))
    if not base.is_dir():
        pytest.fail(f"scratch dir {base} missing (DMABUFD_VM_SCRATCH)")
    d = base / f"guest-tests-{os.getpid()}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def f2fs_dir() -> Iterator[Path]:
    """A directory on the f2fs disk (DMABUFD_VM_F2FS), for tests that run on ext4 and f2fs."""
    value = os.environ.get("DMABUFD_VM_F2FS")
    if not value or not Path(value).is_dir():
        pytest.skip("no f2fs disk in this guest (run with --disk f2fs:SIZE_MB)")
    d = Path(value) / f"guest-tests-{os.getpid()}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Kernel reports, test by test


class KmsgWatch:
    """Reads the kernel log records that appeared since the last look."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        # what happened before the session is the host's end-of-run check's business
        os.lseek(self.fd, 0, os.SEEK_END)
        self.debug_locks = self.read_debug_locks()

    @staticmethod
    def read_debug_locks() -> int | None:
        try:
            return vm.parse_debug_locks(LOCKDEP_STATS.read_text())
        except OSError:
            return None

    def new_lines(self) -> list[str]:
        lines: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 16384)
            except BlockingIOError:
                break
            except BrokenPipeError:
                # records were overwritten before we read them; reading goes on after the gap
                lines.append("(kernel log records lost: the ring buffer wrapped)")
                continue
            if not record:
                break
            lines.extend(vm.kmsg_record_lines(record))
        return lines

    def problems(self) -> list[str]:
        """The reports since the last call, and lockdep turning itself off."""
        found = [r.text() for r in vm.parse_kernel_reports(self.new_lines())]
        now = self.read_debug_locks()
        if self.debug_locks == 1 and now == 0:
            found.append("lockdep turned itself off (debug_locks 1 -> 0 in /proc/lockdep_stats)")
        self.debug_locks = now
        return found

    @staticmethod
    def mark(what: str, nodeid: str) -> None:
        with contextlib.suppress(OSError), open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<5>{vm.KMSG_MARKER} {what} {nodeid}\n")


# One reader for the whole session, made when it starts (empty: no check, e.g. not in the VM).
_watches: list[KmsgWatch] = []


def _watch() -> KmsgWatch | None:
    return _watches[0] if _watches else None


def pytest_sessionstart(session: pytest.Session) -> None:
    if IN_VM and os.path.exists("/dev/kmsg") and not _watches:
        try:
            _watches.append(KmsgWatch())
        except OSError as e:
            print(f"kernel report check disabled: /dev/kmsg: {e}", file=sys.stderr)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    watch = _watch()
    if watch is None:
        return
    # Between tests (a session fixture's teardown, say): not this test's doing, and the host's
    # check of the whole dmesg fails the run for it anyway.
    leftover = watch.problems()
    if leftover:
        print(f"\nkernel reports before {item.nodeid}:\n" + "\n".join(leftover), file=sys.stderr)
    watch.mark("start", item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    watch = _watch()
    if watch is None or call.when not in ("call", "teardown"):
        return report
    problems = watch.problems()
    if call.when == "teardown":
        watch.mark("end", item.nodeid)
    if problems:
        text = f"the kernel reported during {item.nodeid} ({call.when}):\n" + "\n".join(problems)
        if report.failed:
            report.sections.append(("kernel reports", text))
        else:
            report.outcome = "failed"
            report.longrepr = text
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    watch = _watch()
    if watch is None:
        return
    leftover = watch.problems()
    if leftover:
        print("\nkernel reports after the last test:\n" + "\n".join(leftover), file=sys.stderr)
