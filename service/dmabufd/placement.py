"""Where the daemon's threads run, and at what priority: the event loop at
nice `[scheduling] loop_nice`, every other thread at the nice the daemon
was started with; the event loop and the `call` threads on the CPUs
`[scheduling] call_cpus` names, every other thread on all the CPUs the
daemon was started with.

Priority. The loop serves every allocation and Release, and each REPLY it
sends wakes a client. A Unix socket wakes its reader with a hint that
favours the sender's CPU, so on a busy machine the woken client often runs
on the loop's CPU and preempts the loop, which then waits runnable while
the other CPU idles (bench/README.md, "Allocation": with eight clients
allocating, the loop waited for a CPU a quarter of the time). A loop at a
better nice than its clients weighs more with the scheduler and keeps its
CPU: the default, -4, is Android's ANDROID_PRIORITY_DISPLAY. Only the loop
gains it: the `call` and `load` threads, the closing threads and the /proc
helpers run at the daemon's own nice, so blocking work a client causes
(allocations from device heaps, loads, closes, /proc reads) never gets a
better one. A client that floods the loop can make it busy, as it could at
nice 0, but the loop is one thread: it takes at most one CPU, with about
2.4 times the weight of a nice-0 thread (2,501 against 1,024).

A nice counts within the loop's scheduling group. Where the daemon has a
group of its own (a service's cpu cgroup under systemd's cpu controller,
or autogroup's group per session), a client outside it is weighed against
that whole group, whose weight (CPUWeight=, cpu.shares, the autogroup's
nice) is the deployment's to set, and the loop's nice changes little
(bench/README.md measures both). Where the daemon sits in the root group
beside child groups (Android's root cpuctl group, with apps in top-app and
the others), the loop itself is weighed against each app's group, and its
nice counts there too. Clients in the daemon's own group (native HALs
beside it; everything, where nothing groups tasks) meet the nice alone.

The loop never gets a worse nice than the daemon started with (an
operator who started it at -8 keeps -8), so a loop_nice at or above the
daemon's own (19 always is) leaves the loop there. Lowering a nice needs
CAP_SYS_NICE or an RLIMIT_NICE allowing it (init's `rlimit nice`,
systemd's LimitNICE=); without either the loop stays where it is, said
once in the log, and the daemon runs as before.

CPUs. The loop and the call threads serve the clients' calls and hand the
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

call_cpus is off by default: where threads run is the device's call
(cpusets, big and little cores), not the daemon's. And held on CPUs, the
daemon shares them with whatever else runs there: a process that keeps
them busy slows every client's calls, where the kernel would otherwise
move the daemon away from it.

A thread starts with the CPUs and the nice of the thread that starts it,
and the loop starts most of ours, so each executor's threads take their
place as they start (`place_call_thread` or `place_thread`), and so do
the closing threads; a /proc helper the loop starts moves itself once its
interpreter has started, before it serves, with the arguments
`helper_arguments` gives it (`take_place`). Threads
started before the loop is placed (heap discovery, metrics, gRPC's own)
and those started by load threads (lanes, as-client opens) have every CPU
and the daemon's nice already. "Every CPU" is the daemon's affinity at
start (taskset, systemd's CPUAffinity=): an operator's limit stays, and a
cpuset that grows later is not followed.

No lock: the CPU sets and nice values are fixed when the daemon is built,
each call changes only the calling thread, `_loop_raised` is set by the
loop before it starts the threads that read it, and the `_warned` flags
only spare the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from dmabufd_common.cpus import format_cpus

log = logging.getLogger(__name__)


class Placement:
    def __init__(self, call_cpus: frozenset[int] | None, loop_nice: int) -> None:
        """Built on the main thread before any thread of the daemon starts,
        so the CPUs and the nice it finds are those the daemon was given."""
        self.call_cpus = call_cpus
        self.everywhere = frozenset(os.sched_getaffinity(0))
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.loop_nice = min(loop_nice, self.nice)
        # Set once by the loop, before it starts the threads that read it.
        self._loop_raised = False
        self._warned = False
        self._warned_nice = False

    def place_loop(self) -> None:
        """On the event loop's thread, once the threads that must keep
        every CPU and the daemon's nice have started. Raises OSError,
        naming the setting, if none of call_cpus is left to the daemon; a
        nice it may not take only leaves the loop at the daemon's."""
        if self.call_cpus is not None:
            try:
                os.sched_setaffinity(0, self.call_cpus)
            except OSError as error:
                raise OSError(
                    error.errno,
                    f"cannot hold the event loop on CPU(s) {format_cpus(self.call_cpus)} "
                    f"(scheduling.call_cpus): {error.strerror}",
                ) from None
            log.info("the event loop and call threads run on CPU(s) %s", format_cpus(self.call_cpus))
        if self.loop_nice == self.nice:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, 0, self.loop_nice)
        except OSError as error:
            log.warning(
                "the event loop runs at nice %d, not %d (scheduling.loop_nice): %s; it needs CAP_SYS_NICE "
                "or an RLIMIT_NICE of %d (init: rlimit nice; systemd: LimitNICE=%d), or loop_nice = %d",
                self.nice,
                self.loop_nice,
                error.strerror,
                20 - self.loop_nice,
                self.loop_nice,
                self.nice,
            )
            return
        self._loop_raised = True
        log.info("the event loop runs at nice %d, every other thread at %d", self.loop_nice, self.nice)

    def place_call_thread(self) -> None:
        """First thing in each `call` thread."""
        if self.call_cpus is not None:
            self._move(self.call_cpus)
        self._settle()

    def place_thread(self) -> None:
        """First thing in any other thread the loop may have started."""
        if self.call_cpus is not None:
            self._move(self.everywhere)
        self._settle()

    def helper_arguments(self) -> tuple[str, ...]:
        """The arguments with which a /proc helper (sessions/holders.py),
        which the loop may start, takes every CPU and the daemon's nice
        before it serves (take_place)."""
        arguments: tuple[str, ...] = ()
        if self.call_cpus is not None:
            arguments += ("--cpus", format_cpus(self.everywhere))
        if self.loop_nice != self.nice:
            arguments += ("--nice", str(self.nice))
        return arguments

    def call_executor(self, workers: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="call", initializer=self.place_call_thread)

    def thread_executor(self, workers: int, prefix: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=prefix, initializer=self.place_thread)

    def _settle(self) -> None:
        """Back to the daemon's nice: this thread may have started with the
        loop's. A nice may always be raised, unless an LSM refuses
        (SELinux's setsched): the thread then keeps the loop's, said once,
        and the daemon goes on."""
        if not self._loop_raised:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, 0, self.nice)
        except OSError as error:
            if not self._warned_nice:
                self._warned_nice = True
                log.warning("a thread keeps the event loop's nice %d: %s", self.loop_nice, error.strerror)

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


def take_place(cpus: frozenset[int] | None, nice: int | None) -> None:
    """In a /proc helper (sessions/holders.py), before it serves: it starts
    with the CPUs and nice of the thread that started it, often the loop
    (its interpreter's start-up, tens of milliseconds, runs there).
    The helper moves itself: moved by pid from the daemon, it could have
    been reaped meanwhile and its pid given to another process. A helper
    that cannot move is only slower, or keeps the loop's nice where an LSM
    refuses setsched (the daemon's own threads then say so)."""
    if cpus is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
    if nice is not None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
