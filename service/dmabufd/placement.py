"""Where the daemon's threads run: the event loop and the `call` threads on
the CPUs `[scheduling] call_cpus` names, every other thread wherever the
daemon may run.

Why: the loop and the call threads serve the clients' calls and hand the
interpreter's lock to each other (a Release runs on a call thread while
the loop reads the next ALLOCATE frame). Left free, the kernel spreads
them over the CPUs, so a hand-off wakes a thread on another CPU, and the
wake-ups of the clients' sockets pull them further apart. On two CPUs,
with both held on one, eight clients allocated about 1.25x as fast as
with them free; the loop alone held there gained little (bench/README.md,
"Allocation"). Loads keep every CPU: their lanes spend their time in
system calls, without the lock, and the page faults of fresh memory want
the other CPU. The setting is off by default: where threads run is the
device's call (cpusets, big and little cores), not the daemon's.

A thread starts with the CPUs of the thread that starts it, and the loop
starts most of ours, so each executor's threads begin by taking their own
place (`serve_calls` or `leave_calls`), and so do the closing threads.
Threads started before the loop is pinned (heap discovery, metrics, gRPC's
own) and those started by load threads (lanes, as-client opens) have every
CPU already.

No lock: the CPU sets are fixed when the daemon is built, and each call
changes only the calling thread.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

from dmabufd_common.cpus import format_cpus

log = logging.getLogger(__name__)


class Placement:
    def __init__(self, call_cpus: frozenset[int] | None) -> None:
        """Built on the main thread before any thread of the daemon starts,
        so the CPUs it finds are all those the daemon was given."""
        self.call_cpus = call_cpus
        self.everywhere = frozenset(os.sched_getaffinity(0))

    def pin_loop(self) -> None:
        """On the event loop's thread, once the threads that must keep
        every CPU have started. Raises OSError if none of call_cpus is
        left to the daemon."""
        if self.call_cpus is None:
            return
        os.sched_setaffinity(0, self.call_cpus)
        log.info("the event loop and call threads run on CPU(s) %s", format_cpus(self.call_cpus))

    def serve_calls(self) -> None:
        """First thing in each `call` thread."""
        if self.call_cpus is not None:
            self._move(self.call_cpus)

    def leave_calls(self) -> None:
        """First thing in any other thread the loop may have started."""
        if self.call_cpus is not None:
            self._move(self.everywhere)

    def call_executor(self, workers: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="call", initializer=self.serve_calls)

    def executor(self, workers: int, prefix: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=self.leave_calls)

    @staticmethod
    def _move(cpus: frozenset[int]) -> None:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as error:
            # None of those CPUs is left to the daemon (its cpuset
            # changed): the thread stays where it is, which is only slower.
            log.warning("a thread stays on CPU(s) %s: %s", format_cpus(os.sched_getaffinity(0)), error.strerror)
