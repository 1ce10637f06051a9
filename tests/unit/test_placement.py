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
from dmabufd.sessions.holders import HELPER_COMMAND, READY
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


def start_helper(arguments: tuple[str, ...]) -> tuple[int, frozenset[int], int]:
    """Start a /proc helper as the daemon does; its nice and CPUs once it
    says it is ready, and its exit status once its stdin closes."""
    helper = subprocess.Popen([*HELPER_COMMAND, *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert helper.stdin is not None
    assert helper.stdout is not None
    try:
        assert helper.stdout.readline() == READY
        placed = nice_of(helper.pid), frozenset(os.sched_getaffinity(helper.pid))
    finally:
        helper.stdin.close()
        status = helper.wait(timeout=30)
        helper.stdout.close()
    return (*placed, status)


def test_only_the_loop_runs_at_loop_nice_and_what_it_starts_is_put_back() -> None:
    require_root()
    everywhere = frozenset(os.sched_getaffinity(0))
    one = frozenset({max(everywhere)})

    def loop() -> dict[str, object]:
        base = nice_of()
        placement = Placement(one, base - 3)
        placement.place_loop()
        found: dict[str, object] = {"base": base, "loop": nice_of()}
        with ThreadPoolExecutor(max_workers=1) as bare:
            found["bare thread"] = bare.submit(nice_of).result()
        with placement.call_executor(1) as calls:
            found["call thread"] = calls.submit(nice_of).result()
        with placement.thread_executor(1, "load") as loads:
            found["load thread"] = loads.submit(nice_of).result()
        found["bare helper"] = start_helper(())
        found["helper"] = start_helper(placement.helper_arguments())
        return found

    found = on_a_thread(loop)
    base = found["base"]
    assert isinstance(base, int)
    assert found["loop"] == base - 3
    assert found["bare thread"] == base - 3, "a thread starts with its starter's nice: the hooks are needed"
    assert found["bare helper"] == (base - 3, one, 0), "and a process with its nice and CPUs"
    assert found["call thread"] == found["load thread"] == base
    assert found["helper"] == (base, everywhere, 0), "the helper takes its place first thing"


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
    base = nice_of()
    wanted = max(-20, base - 4)
    script = (
        "import logging, os, resource, sys\n"
        "from dmabufd.placement import Placement\n"  # imported as root: the interpreter may be root's
        "logging.basicConfig(stream=sys.stderr, level=logging.WARNING)\n"
        "resource.setrlimit(resource.RLIMIT_NICE, (0, 0))\n"
        f"os.setgroups([]); os.setgid({ROOTLESS_UID}); os.setuid({ROOTLESS_UID})\n"
        f"placement = Placement(None, {wanted})\n"
        "placement.place_loop()\n"
        "with placement.thread_executor(1, 'load') as loads:\n"
        "    print(os.getpriority(os.PRIO_PROCESS, 0), loads.submit(os.getpriority, os.PRIO_PROCESS, 0).result())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(base), str(base)]
    assert f"the event loop runs at nice {base}, not {wanted} (scheduling.loop_nice)" in done.stderr
    assert f"CAP_SYS_NICE or an RLIMIT_NICE of {20 - wanted}" in done.stderr
