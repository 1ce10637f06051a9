"""Placement (service/dmabufd/placement.py): a CPU set the daemon may not
use, and the loop's nice: only the loop has it, and a nice it may not take
leaves the daemon running as before."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from dmabufd.placement import Placement
from dmabufd_common.cpus import MAX_CPU
from tests.conftest import ROOTLESS_UID, assert_reachable_by_others

T = TypeVar("T")

NO_SUCH_CPU = frozenset({MAX_CPU})


def test_a_loop_that_cannot_be_pinned_stops_start_up_naming_the_setting() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(OSError, match=r"scheduling\.call_cpus"):
        Placement(NO_SUCH_CPU, 0).place_loop()
    assert os.sched_getaffinity(0) == before


def test_a_thread_that_cannot_move_stays_and_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    placement = Placement(NO_SUCH_CPU, 0)
    before = os.sched_getaffinity(0)
    with caplog.at_level(logging.WARNING, logger="dmabufd.placement"):
        for _ in range(3):
            placement.place_call_thread()
    assert os.sched_getaffinity(0) == before
    assert len([r for r in caplog.records if "threads stay on CPU(s)" in r.getMessage()]) == 1


def test_without_call_cpus_nothing_moves() -> None:
    placement = Placement(None, 0)
    before = os.sched_getaffinity(0)
    placement.place_loop()
    placement.place_call_thread()
    placement.place_thread()
    assert os.sched_getaffinity(0) == before


def nice_of(tid: int = 0) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def on_a_thread(body: Callable[[], T]) -> T:
    """Run `body` on a thread of its own, so the nice it sets dies with it."""
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(body).result(timeout=30)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it lowers a thread's nice")


def test_only_the_loop_runs_at_loop_nice_and_what_it_starts_is_put_back() -> None:
    require_root()

    def loop() -> dict[str, int]:
        base = nice_of()
        placement = Placement(None, base - 3)
        placement.place_loop()
        found = {"base": base, "loop": nice_of()}
        with ThreadPoolExecutor(max_workers=1) as bare:
            found["bare thread"] = bare.submit(nice_of).result()
        with placement.call_executor(1) as calls:
            found["call thread"] = calls.submit(nice_of).result()
        with placement.thread_executor(1, "load") as loads:
            found["load thread"] = loads.submit(nice_of).result()
        helper = subprocess.Popen(["sleep", "30"])
        try:
            found["helper as started"] = nice_of(helper.pid)
            placement.place_helper(helper.pid)
            found["helper placed"] = nice_of(helper.pid)
        finally:
            helper.kill()
            helper.wait()
        return found

    found = on_a_thread(loop)
    base = found["base"]
    assert found["loop"] == base - 3
    assert found["bare thread"] == base - 3, "a thread starts with its starter's nice: the hooks are needed"
    assert found["helper as started"] == base - 3, "and so does a process"
    assert found["call thread"] == found["load thread"] == found["helper placed"] == base


def test_the_loop_never_runs_below_the_nice_the_daemon_was_given() -> None:
    require_root()

    def loop() -> tuple[int, int]:
        os.setpriority(os.PRIO_PROCESS, 0, -6)  # an operator's `nice -n -6 dmabufd`
        placement = Placement(None, -4)
        placement.place_loop()
        with placement.thread_executor(1, "load") as loads:
            return nice_of(), loads.submit(nice_of).result()

    assert on_a_thread(loop) == (-6, -6)


def test_a_loop_that_may_not_lower_its_nice_says_how_and_runs_on() -> None:
    """As a user without CAP_SYS_NICE or an RLIMIT_NICE: the loop keeps the
    daemon's nice, the log names the setting and what would allow it."""
    require_root()
    assert_reachable_by_others()
    script = (
        "import logging, os, resource, sys\n"
        "from dmabufd.placement import Placement\n"  # imported as root: the interpreter may be root's
        "logging.basicConfig(stream=sys.stderr, level=logging.WARNING)\n"
        "resource.setrlimit(resource.RLIMIT_NICE, (0, 0))\n"
        f"os.setgroups([]); os.setgid({ROOTLESS_UID}); os.setuid({ROOTLESS_UID})\n"
        "placement = Placement(None, -4)\n"
        "placement.place_loop()\n"
        "with placement.thread_executor(1, 'load') as loads:\n"
        "    print(os.getpriority(os.PRIO_PROCESS, 0), loads.submit(os.getpriority, os.PRIO_PROCESS, 0).result())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0"]
    assert "the event loop runs at nice 0, not -4 (scheduling.loop_nice)" in done.stderr
    assert "CAP_SYS_NICE or an RLIMIT_NICE of 24" in done.stderr
