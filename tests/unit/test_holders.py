"""The helper processes that answer holder checks for the event loop
(service/dmabufd/sessions/holders.py): right answers from a real helper, and
a helper that stalls, lies, dies or is abandoned costs one helper and one
check (answered "all held"), never the other uids' checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest

from dmabufd.sessions import procfs
from dmabufd.sessions.holders import HELPER_COMMAND, MAX_PROCESSES_PER_HELPER, HolderChecks

# A helper that misbehaves on request: a query whose uids name one of these
# makes it stall, answer garbage, name a file not asked about, or exit.
STALL, GARBAGE, STRANGER, EXIT = 900001, 900002, 900003, 900004
FAKE_HELPER = f"""
import json, sys, time
from dmabufd.sessions import procfs
print("ready", flush=True)
for line in sys.stdin:
    body = json.loads(line)
    uids = body["uids"]
    if {STALL} in uids:
        time.sleep(3600)
    if {GARBAGE} in uids:
        print("not json", flush=True)
        continue
    if {STRANGER} in uids:
        print(json.dumps([[1, 2]]), flush=True)
        continue
    if {EXIT} in uids:
        sys.exit(0)
    query = procfs.HolderQuery(tuple(body["pids"]), (), tuple((d, i) for d, i in body["wanted"]))
    print(json.dumps([list(f) for f in procfs.held(query)]), flush=True)
"""
FAKE_COMMAND = (sys.executable, "-c", FAKE_HELPER)
TIMEOUT_S = 0.5


def identity_of(fd: int) -> procfs.FileIdentity:
    info = os.fstat(fd)
    return (info.st_dev, info.st_ino)


@pytest.fixture
def holder() -> Iterator[tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity]]:
    """A child process holding one memfd by an fd and another by a mapping
    only; a third memfd nobody else holds. Yields (pid, by_fd, by_map, free)."""
    by_fd, by_map, free = (os.memfd_create(name) for name in ("by-fd", "by-map", "free"))
    os.ftruncate(by_map, 4096)
    code = (
        "import mmap, os, sys, time\n"
        f"m = mmap.mmap({by_map}, 4096)\n"
        f"os.close({by_map})\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], pass_fds=(by_fd, by_map), stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    try:
        yield child.pid, identity_of(by_fd), identity_of(by_map), identity_of(free)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        for fd in (by_fd, by_map, free):
            os.close(fd)


@contextlib.asynccontextmanager
async def running(
    helpers: int, *, timeout_s: float = TIMEOUT_S, command: tuple[str, ...] = FAKE_COMMAND, end_stuck: bool = False
) -> AsyncIterator[HolderChecks]:
    """HolderChecks, started, and closed at the end; with `end_stuck`,
    fake helpers a kill did not end (`undying`) are killed first."""
    checks = HolderChecks(helpers, timeout_s=timeout_s, command=command)
    await checks.start()
    try:
        yield checks
    finally:
        if end_stuck:
            for stuck in helper_pids():
                os.kill(stuck, signal.SIGKILL)
        await checks.close(5.0)


@pytest.fixture
def undying(monkeypatch: pytest.MonkeyPatch) -> None:
    """Helpers that a kill does not end, standing in for one the kernel
    holds in an uninterruptible wait (a FUSE request it read)."""
    monkeypatch.setattr("dmabufd.sessions.holders._Helper.kill", lambda self: None)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def test_a_real_helper_answers_what_proc_says(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity],
) -> None:
    pid, by_fd, by_map, free = holder
    query = procfs.HolderQuery((pid,), (), (by_fd, by_map, free))

    async def main() -> None:
        async with running(1, command=HELPER_COMMAND) as checks:
            answer = await checks.held(0, query)
        assert answer == procfs.held(query) == {by_fd, by_map}

    run(main)


def helper_pids() -> set[int]:
    """This test process's children that run the fake helper."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    is_fake = b"900001" in cmdline.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == os.getpid() and is_fake:
                found.add(int(name))
    return found


@pytest.mark.parametrize("failure", [STALL, GARBAGE, STRANGER, EXIT])
def test_a_failing_helper_costs_one_check_and_is_replaced(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity], failure: int
) -> None:
    """A check whose helper stalls, answers garbage or a file not asked
    about, or exits, answers that every file is held (the charge stays);
    the helper is killed and the next check gets a working replacement."""
    pid, by_fd, by_map, free = holder
    wanted = (by_fd, by_map, free)

    async def main() -> None:
        async with running(1, timeout_s=TIMEOUT_S) as checks:
            (first,) = helper_pids()
            started = time.monotonic()
            answer = await checks.held(1000, procfs.HolderQuery((pid,), (failure,), wanted))
            took = time.monotonic() - started
            assert answer == set(wanted)
            assert took < TIMEOUT_S + 1.0
            assert await checks.held(1000, procfs.HolderQuery((pid,), (), wanted)) == {by_fd, by_map}
            await asyncio.sleep(0.2)  # the old helper's reaping
            assert first not in helper_pids()
        assert helper_pids() == set()

    run(main)


def test_a_uid_whose_check_hangs_does_not_hold_up_another_uid(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity],
) -> None:
    """Attack: uid 1000's checks hang (its process's maps or a FUSE file's
    stat never answer), and it asks two at once. Defence: its checks take
    their turns (one helper at most); uid 2000 is answered at once on the
    other helper, while uid 1000's first check is still waiting."""
    pid, by_fd, by_map, free = holder
    wanted = (by_fd, by_map, free)
    stalls = procfs.HolderQuery((pid,), (STALL,), wanted)

    async def main() -> None:
        async with running(2, timeout_s=2.0) as checks:
            stalled = [asyncio.create_task(checks.held(1000, stalls)) for _ in range(2)]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            answer = await checks.held(2000, procfs.HolderQuery((pid,), (), wanted))
            took = time.monotonic() - started
            assert answer == {by_fd, by_map}
            assert took < 0.5, f"uid 2000 waited {took:.2f} s behind uid 1000's hung checks"
            assert not any(task.done() for task in stalled)
            assert await asyncio.gather(*stalled) == [set(wanted), set(wanted)]

    run(main)


def test_a_check_cancelled_mid_question_costs_its_helper_only(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity],
) -> None:
    """A check abandoned while its helper works must not leave the answer
    in the pipe for the next question to read."""
    pid, by_fd, by_map, free = holder
    wanted = (by_fd, by_map, free)

    async def main() -> None:
        async with running(1, timeout_s=5.0) as checks:
            task = asyncio.create_task(checks.held(1000, procfs.HolderQuery((pid,), (STALL,), wanted)))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await checks.held(1000, procfs.HolderQuery((pid,), (), (free,))) == set()
            assert await checks.held(1000, procfs.HolderQuery((pid,), (), wanted)) == {by_fd, by_map}

    run(main)


def test_no_question_needs_no_helper() -> None:
    async def main() -> None:
        checks = HolderChecks(1, command=("/nonexistent/helper",))
        assert await checks.held(1000, procfs.HolderQuery((1,), (1000,), ())) == set()

    run(main)


def test_without_any_helper_every_file_stays_held() -> None:
    """Out of processes or fds, no helper can start: the check keeps every
    charge (the reaper looks again later) rather than failing the call."""
    identity = (1, 2)

    async def main() -> None:
        checks = HolderChecks(1, command=("/nonexistent/helper",))
        assert await checks.held(1000, procfs.HolderQuery((1,), (), (identity,))) == {identity}

    run(main)


def test_a_helper_that_never_says_it_is_ready_fails_the_start() -> None:
    """A broken install (the helper exits at once) stops the daemon at
    start, loudly, rather than keeping every charge for ever."""

    async def main() -> None:
        checks = HolderChecks(1, command=(sys.executable, "-c", "pass"))
        with pytest.raises(OSError, match="did not start"):
            await checks.start()
        await checks.close(5.0)

    run(main)


def test_after_a_failure_many_uids_at_once_start_one_replacement(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity],
) -> None:
    """Ten uids asking at once, right after the one helper was retired,
    start one replacement between them, not ten."""
    pid, by_fd, by_map, free = holder
    wanted = (by_fd, by_map, free)

    async def main() -> None:
        async with running(1, timeout_s=TIMEOUT_S) as checks:
            await checks.held(1000, procfs.HolderQuery((pid,), (GARBAGE,), wanted))
            answers = await asyncio.gather(
                *(checks.held(2000 + n, procfs.HolderQuery((pid,), (), wanted)) for n in range(10))
            )
            assert answers == [{by_fd, by_map}] * 10
            await asyncio.sleep(0.2)
            assert len(helper_pids()) == 1

    run(main)


def test_helpers_that_do_not_die_are_not_replaced_for_ever(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity],
    undying: None,
) -> None:
    """Attack: a client makes each check of its buffers hang where even
    SIGKILL cannot end the helper (waiting on a FUSE server that read the
    request). Stood in for here by a kill that does nothing. Defence:
    replacements stop at MAX_PROCESSES_PER_HELPER helpers per pool slot;
    past that a check answers at once that everything stays held."""
    pid, by_fd, by_map, free = holder
    stalls = procfs.HolderQuery((pid,), (STALL,), (by_fd, by_map, free))

    async def main() -> None:
        async with running(1, timeout_s=0.3, end_stuck=True) as checks:
            for _ in range(MAX_PROCESSES_PER_HELPER):
                assert await checks.held(1000, stalls) == set(stalls.wanted)
            started = time.monotonic()
            assert await checks.held(2000, procfs.HolderQuery((pid,), (), (free,))) == {free}
            assert time.monotonic() - started < 0.2
            assert len(helper_pids()) == MAX_PROCESSES_PER_HELPER

    run(main)


def test_at_stop_waiting_checks_answer_at_once(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity],
) -> None:
    """A uid with many releases waiting behind a hung check cannot hold
    the daemon's stop: once it stops asking, they keep their charges."""
    pid, by_fd, by_map, free = holder
    stalls = procfs.HolderQuery((pid,), (STALL,), (by_fd, by_map, free))

    async def main() -> None:
        async with running(1, timeout_s=1.0) as checks:
            waiting = [asyncio.create_task(checks.held(1000, stalls)) for _ in range(20)]
            await asyncio.sleep(0.1)
            started = time.monotonic()
            checks.stop_asking()
            assert await asyncio.gather(*waiting) == [set(stalls.wanted)] * 20
            assert time.monotonic() - started < 1.5  # the one asked runs out its time

    run(main)


def test_no_check_waits_for_ever_once_helpers_stop_being_replaced(
    holder: tuple[int, procfs.FileIdentity, procfs.FileIdentity, procfs.FileIdentity],
    undying: None,
) -> None:
    """Four uids wait on one helper; the first two checks hang and their
    helpers never die, so no more may start. The other two must still be
    answered ("all held"), not left waiting for a helper that never comes."""
    pid, by_fd, by_map, free = holder
    wanted = (by_fd, by_map, free)

    async def main() -> None:
        async with running(1, timeout_s=0.3, end_stuck=True) as checks:
            queries = [procfs.HolderQuery((pid,), (STALL,), wanted)] * 2 + [procfs.HolderQuery((pid,), (), wanted)] * 2
            asked = asyncio.gather(*(checks.held(1000 + n, query) for n, query in enumerate(queries)))
            answers = await asyncio.wait_for(asked, 5.0)
            assert answers == [set(wanted)] * 4

    run(main)
