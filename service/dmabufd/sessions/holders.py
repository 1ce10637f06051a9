"""Which processes still hold released buffers, asked of helper processes.

A Release is answered on the event loop, but the /proc check that decides
what stays charged may block: it reads the client's maps, which waits for
the client's mmap lock, and walks fds of processes the client controls
(procfs.open_files reads their links and only a memfd's or a dma-buf's
fdinfo, so no FUSE server is asked; but /proc is the kernel's, and a check
is the client's to make slow). On a `call` thread, the check took the
interpreter's lock from the loop and gave it back at every system call;
with eight clients allocating, those hand-offs cost the loop about a sixth
of its rate (bench/README.md, "Allocation"). A helper process shares no
lock with the loop: the loop writes the question to a pipe and reads the
answer when it comes.

HolderChecks keeps HELPERS such processes (`python -m
dmabufd.sessions.holders`, started with the daemon). A uid has one check
asked at a time; the others of the uid wait their turn on the loop, so a
uid whose check hangs holds one helper, not all of them. A check that takes
longer than CHECK_TIMEOUT_S, or a helper that dies or answers nonsense,
costs that helper: it is killed and replaced, and the check answers that
every buffer is still held (a charge is kept rather than lost; the reaper
looks again from a thread). A killed helper counts until it is reaped (one
the kernel holds in an uninterruptible wait may take long), and no more
than MAX_PROCESSES_PER_HELPER times HELPERS processes live at once: past
that, checks answer "all held" at once. At stop, checks not asked yet do
the same (stop_asking). The daemon's other /proc checks (session
clean-up, models, the reaper) run where they are, on threads: they are not
on the allocation path.

Everything here runs on the event loop, so nothing needs a lock. The
helper side, serve(), is one loop over its stdin.

Wire format: the helper says READY once it has started; then one JSON
line each way per check: {"pids": [...], "uids": [...], "wanted": [[dev,
ino], ...]} in, the held subset of "wanted" out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import json
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from typing import TextIO

from dmabufd.placement import take_place
from dmabufd.sessions import procfs
from dmabufd_common.cpus import parse_cpus

log = logging.getLogger(__name__)

HELPERS = 2
CHECK_TIMEOUT_S = 2.0
MAX_PROCESSES_PER_HELPER = 2
STARTUP_TIMEOUT_S = 30.0
READY = b"ready\n"
HELPER_COMMAND = (sys.executable, "-m", "dmabufd.sessions.holders")
# An answer names at most the files asked about, ~30 bytes each; a line
# longer than this is a broken helper.
MAX_LINE_BYTES = 16 << 20


class HelperFailed(Exception):
    """A helper process gave no usable answer."""


def _encode(query: procfs.HolderQuery) -> bytes:
    body = {"pids": list(query.pids), "uids": list(query.uids), "wanted": [list(w) for w in query.wanted]}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes, query: procfs.HolderQuery) -> frozenset[procfs.FileIdentity]:
    """The helper's answer, which must name only files asked about."""
    try:
        named = json.loads(line)
        answer = frozenset((int(dev), int(ino)) for dev, ino in named)
    except (ValueError, TypeError) as error:
        raise HelperFailed(f"unreadable answer: {error}") from None
    if not answer <= frozenset(query.wanted):
        raise HelperFailed("the answer names files that were not asked about")
    return answer


class _Helper:
    """One helper process and its pipes; one question at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def ask(self, query: procfs.HolderQuery) -> frozenset[procfs.FileIdentity]:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        try:
            stdin.write(_encode(query))
            await stdin.drain()
            line = await stdout.readline()
        except (OSError, ValueError) as error:  # a closed pipe; a line past the limit
            raise HelperFailed(str(error) or type(error).__name__) from None
        if not line.endswith(b"\n"):
            raise HelperFailed(f"the helper exited (status {self.process.returncode})")
        return _decode(line, query)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        if self.process.stdin is not None:
            self.process.stdin.close()


class _Turn:
    """A uid's checks, one at a time; `users` counts those asked and waiting."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class HolderChecks:
    def __init__(
        self,
        helpers: int = HELPERS,
        *,
        timeout_s: float = CHECK_TIMEOUT_S,
        command: Sequence[str] = HELPER_COMMAND,
    ) -> None:
        """`command` starts a helper; the daemon's adds the arguments with
        which the helper takes its place (placement.py): it starts with the
        loop's CPUs and nice."""
        self._helpers = helpers
        self._timeout_s = timeout_s
        self._command = tuple(command)
        self._idle: collections.deque[_Helper] = collections.deque()
        # Helpers in the pool: idle, asked, or starting (counted before
        # they exist, so concurrent takers never start more than _helpers).
        self._pooled = 0
        # Helper processes not reaped yet, the pool's and the retired: a
        # killed helper may not die at once (a process waiting on a FUSE
        # server is not killable once the request was read), and
        # replacements stop at MAX_PROCESSES_PER_HELPER times the pool.
        self._processes = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        # Each uid's turn, while one of its checks is asked or waiting.
        self._turns: dict[int, _Turn] = {}
        self._exits: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Start the helpers, before the loop takes its place (placement.py).
        Raises OSError if one cannot start."""
        started = await asyncio.gather(*(self._spawn() for _ in range(self._helpers)), return_exceptions=True)
        helpers = [helper for helper in started if isinstance(helper, _Helper)]
        failed = [error for error in started if not isinstance(error, _Helper)]
        if failed:
            for helper in helpers:
                self._retire(helper)
            raise failed[0]
        self._idle.extend(helpers)

    def stop_asking(self) -> None:
        """At stop: checks not asked yet answer at once that every file is
        held (the ledger gives the lingering buffers back as it closes), so
        a uid with thousands of releases waiting cannot hold the stop up."""
        self._closing = True
        while self._waiting:
            self._wake()

    async def close(self, wait_s: float) -> None:
        """At stop, once no check is being asked: end every helper, and
        wait up to `wait_s` for them to exit (one stuck in the kernel, in
        a FUSE request say, may take longer: it is not waited for)."""
        self.stop_asking()
        while self._idle:
            self._retire(self._idle.popleft())
        if self._exits:
            _, stuck = await asyncio.wait(self._exits, timeout=wait_s)
            if stuck:
                log.warning("%d /proc helper(s) still running at stop", len(stuck))

    async def held(self, uid: int, query: procfs.HolderQuery) -> frozenset[procfs.FileIdentity]:
        """Which of query.wanted its processes hold (procfs.held(), asked
        of a helper); all of them when the helper fails or is too slow,
        when no helper can start, and once stop_asking() was called."""
        if not query.wanted:
            return frozenset()
        async with self._turn(uid):
            helper = await self._take()
            if helper is None:
                return frozenset(query.wanted)
            try:
                answer = await asyncio.wait_for(helper.ask(query), self._timeout_s)
            except (HelperFailed, TimeoutError) as error:
                reason = str(error) or f"no answer in {self._timeout_s:.0f} s"
                log.warning("a /proc check for uid %d failed (%s): its buffers stay charged", uid, reason)
                self._retire(helper)
                return frozenset(query.wanted)
            except BaseException:  # cancelled with a question unanswered
                self._retire(helper)
                raise
            self._give_back(helper)
            return answer

    @contextlib.asynccontextmanager
    async def _turn(self, uid: int) -> AsyncIterator[None]:
        turn = self._turns.get(uid)
        if turn is None:
            turn = self._turns[uid] = _Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[uid]

    async def _take(self) -> _Helper | None:
        """An idle helper, waiting for one if all are busy; None when none
        can be started, or when stopping."""
        while not self._closing:
            if self._idle:
                return self._idle.popleft()
            if self._pooled < self._helpers and self._processes < MAX_PROCESSES_PER_HELPER * self._helpers:
                try:
                    return await self._spawn()
                except OSError as error:
                    log.warning("cannot start a /proc helper: %s", error)
            if self._pooled == 0:  # none will come back: do not wait for one
                self._wake()  # nor may the next waiter
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # pass the wake-up on
                    self._wake()
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)
        return None

    def _give_back(self, helper: _Helper) -> None:
        if self._closing:
            self._retire(helper)
            return
        self._idle.append(helper)
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _spawn(self) -> _Helper:
        """A new helper of the pool, once it said it is ready: its start-up
        (seconds under emulation) is not counted against its first check."""
        self._pooled += 1
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=MAX_LINE_BYTES,
                # Not the daemon's directory: `-m` looks for the module
                # there first, and it may be writable by others.
                cwd="/",
                # Out of the daemon's process group: a terminal's Ctrl-C is
                # for the daemon, which ends its helpers itself.
                start_new_session=True,
            )
        except BaseException:
            self._pooled -= 1
            self._wake()
            raise
        self._processes += 1
        helper = _Helper(process)
        assert process.stdout is not None
        try:
            said = await asyncio.wait_for(process.stdout.readline(), STARTUP_TIMEOUT_S)
        except (TimeoutError, OSError, ValueError):
            said = b""
        except BaseException:
            self._retire(helper)
            raise
        if said != READY:
            self._retire(helper)
            raise OSError(errno.ECHILD, f"a /proc helper did not start ({' '.join(self._command)})")
        return helper

    def _retire(self, helper: _Helper) -> None:
        """Take a helper out of the pool, kill it and reap it in the
        background; a waiter may now start a replacement."""
        helper.kill()
        self._pooled -= 1
        task = asyncio.get_running_loop().create_task(self._reap(helper))
        self._exits.add(task)
        task.add_done_callback(self._exits.discard)
        self._wake()

    async def _reap(self, helper: _Helper) -> None:
        try:
            await helper.process.wait()
        finally:
            self._processes -= 1
            self._wake()  # a waiter may start a helper now


def serve(questions: TextIO, answers: TextIO) -> None:
    """The helper process: answer each query line with procfs.held()."""
    answers.write(READY.decode())
    answers.flush()
    for line in questions:
        body = json.loads(line)
        query = procfs.HolderQuery(
            tuple(body["pids"]), tuple(body["uids"]), tuple((dev, ino) for dev, ino in body["wanted"])
        )
        answers.write(json.dumps([list(identity) for identity in procfs.held(query)]) + "\n")
        answers.flush()


def main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dmabufd.sessions.holders",
        description="Answer dmabufd's /proc checks on stdin (started by the daemon).",
    )
    parser.add_argument("--cpus", type=parse_cpus, help="the CPUs to move to first (taskset's list)")
    parser.add_argument("--nice", type=int, help="the nice to take first")
    arguments = parser.parse_args(argv)
    take_place(arguments.cpus, arguments.nice)
    serve(sys.stdin, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
