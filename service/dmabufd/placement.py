"""Where the daemon's threads run: the event loop and the `call` threads on
the CPUs `[scheduling] call_cpus` names, every other thread on all the CPUs
the daemon was started with.

Why: the loop and the call threads serve the clients' calls and hand the
interpreter's lock to each other (an allocation from a device heap runs on
a call thread while the loop reads the next ALLOCATE frame). Left free,
the kernel spreads them over the CPUs, so a hand-off can wake a thread on
another CPU, and the wake-ups of the clients' sockets pull them further
apart. Held together on one CPU, eight clients allocating memfds got
faster while their Releases ran on call threads. Since Releases are served
on the loop, those clients use no call thread (only freeing memfds with
more than 16 MiB of pages, or dma-bufs, does), and holding the loop alone
gains nothing (bench/README.md, "Allocation", has the figures). Calls that
still run on the call threads hand the lock over as before.
Loads keep every CPU: their lanes spend their time in system calls,
without the lock, and the page faults of fresh memory want another CPU.

The setting is off by default: where threads run is the device's call
(cpusets, big and little cores), not the daemon's. And held on CPUs, the
daemon shares them with whatever else runs there: a process that keeps
them busy slows every client's calls, where the kernel would otherwise
move the daemon away from it.

A thread starts with the CPUs of the thread that starts it, and the loop
starts most of ours, so each executor's threads take their place as they
start (`pin_call_thread` or `unpin_thread`), and so do the closing
threads. Threads started before the loop is pinned (heap discovery,
metrics, gRPC's own) and those started by load threads (lanes, as-client
opens) have every CPU already. "Every CPU" is the daemon's affinity at
start (taskset, systemd's CPUAffinity=): an operator's limit stays, and a
cpuset that grows later is not followed.

No lock: the CPU sets are fixed when the daemon is built, each call
changes only the calling thread, and `_warned` only spares the log.
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
        self._warned = False

    def pin_loop(self) -> None:
        """On the event loop's thread, once the threads that must keep
        every CPU have started. Raises OSError, naming the setting, if
        none of call_cpus is left to the daemon."""
        if self.call_cpus is None:
            return
        try:
            os.sched_setaffinity(0, self.call_cpus)
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot hold the event loop on CPU(s) {format_cpus(self.call_cpus)} "
                f"(scheduling.call_cpus): {error.strerror}",
            ) from None
        log.info("the event loop and call threads run on CPU(s) %s", format_cpus(self.call_cpus))

    def pin_call_thread(self) -> None:
        """First thing in each `call` thread."""
        if self.call_cpus is not None:
            self._move(self.call_cpus)

    def unpin_thread(self) -> None:
        """First thing in any other thread the loop may have started."""
        if self.call_cpus is not None:
            self._move(self.everywhere)

    def unpin_process(self, pid: int) -> None:
        """A helper process the loop started (sessions/holders.py)."""
        if self.call_cpus is not None:
            try:
                os.sched_setaffinity(pid, self.everywhere)
            except OSError as error:  # gone already, or the cpuset shrank: only slower
                log.debug("helper %d stays on the loop's CPUs: %s", pid, error.strerror)

    def call_executor(self, workers: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="call", initializer=self.pin_call_thread)

    def unpinned_executor(self, workers: int, prefix: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=self.unpin_thread)

    def _move(self, cpus: frozenset[int]) -> None:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as error:
            # None of those CPUs is left to the daemon (its cpuset
            # changed): the thread stays where it is, which is only
            # slower. Said once: clients start closing threads at will.
            if not self._warned:
                self._warned = True
                log.warning(
                    "threads stay on CPU(s) %s, not %s: %s",
                    format_cpus(os.sched_getaffinity(0)),
                    format_cpus(cpus),
                    error.strerror,
                )
