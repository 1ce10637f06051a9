"""The daemon: builds the places (heaps, sessions, transport, api) and
runs them. Start-up order makes each step's dependencies ready first;
shut-down runs in reverse so no call sees a half-dismantled daemon."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

from dmabufd.api.base import Executors
from dmabufd.api.servicer import BufferService
from dmabufd.broker import BufferBroker
from dmabufd.config import Config
from dmabufd.heaps.backend import HeapSpec
from dmabufd.heaps.discovery import HeapDiscovery
from dmabufd.heaps.registry import HeapRegistry
from dmabufd.heaps.reserve import MemfdReserve
from dmabufd.loading.loader import FileLoader
from dmabufd.loading.models import ModelCache
from dmabufd.loading.probe import supported_methods
from dmabufd.observability.metrics import DaemonCollector, MetricsServer, build_registry
from dmabufd.placement import Placement
from dmabufd.pools.pool import PoolTable
from dmabufd.sessions.grants import GrantTable
from dmabufd.sessions.holders import HELPER_COMMAND, HolderChecks
from dmabufd.sessions.ledger import Ledger
from dmabufd.sessions.limits import UidLimits
from dmabufd.sessions.session import Peer, Session, SessionTable
from dmabufd.transport.activation import InheritedSockets
from dmabufd.transport.closer import Closer
from dmabufd.transport.fdserver import FdServer
from dmabufd.transport.grpc_server import ControlServer
from dmabufd.transport.runtime_dir import RuntimeDir, apply_socket_policy
from dmabufd_common.formats import layout

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
    """The daemon keeps one fd per buffer it hands out: lift the soft
    RLIMIT_NOFILE to the hard limit. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# Threads for the handlers' blocking work; loads get their own, bounded
# apart, so a long load never delays an allocation (CONCURRENCY.md).
CALL_WORKERS = 8
LOAD_WORKERS = 4
REAP_INTERVAL_S = 1.0
STOP_CLOSE_WAIT_S = 2.0


class Daemon:
    def __init__(self, config: Config, runtime_dir: Path, inherited: InheritedSockets | None = None) -> None:
        """inherited: the listening sockets a service manager passed; the
        daemon then serves on them and leaves the runtime directory alone."""
        self.config = config
        self.inherited = inherited
        self.runtime = RuntimeDir(runtime_dir) if inherited is None else None
        self.placement = Placement(config.scheduling.call_cpus, config.scheduling.loop_nice)
        self.reserve = MemfdReserve(config.heaps.memfd_reserve)
        self.registry = HeapRegistry(config.heaps, probe=supported_methods, reserve=self.reserve)
        self.grants = GrantTable(config.limits.grant_buffers)
        self.ledger = Ledger(config, on_release=self.grants.buffers_released)
        self.closer = Closer(self.placement.place_thread)
        self.sessions = SessionTable(on_close=self._on_session_closed, closer=self.closer)
        self.limits = UidLimits(config.limits)
        self.broker = BufferBroker(config, self.registry, self.ledger)
        self.loader = FileLoader(config.loading, self.broker, self.reserve)
        self.models = ModelCache(self.loader, self.ledger, config.loading)
        self.pools = PoolTable(self.broker, self.ledger, layout, config.loading.pool_recycle_budget_bytes)
        self.discovery = HeapDiscovery(config.discovery, self._on_heaps_found)
        self.fd_server = FdServer(
            inherited.fd if inherited is not None else self._runtime().fd_socket,
            self.sessions,
            self._admit,
            config.limits,
            self.closer,
        )
        self.holders = HolderChecks(command=(*HELPER_COMMAND, *self.placement.helper_arguments()))
        self.executors = Executors(
            calls=self.placement.call_executor(CALL_WORKERS),
            loads=self.placement.thread_executor(LOAD_WORKERS, "load"),
        )
        self.servicer = servicer = BufferService(
            sessions=self.sessions,
            registry=self.registry,
            ledger=self.ledger,
            broker=self.broker,
            admins=config.clients.admins,
            loader=self.loader,
            models=self.models,
            loading=config.loading,
            pools=self.pools,
            grants=self.grants,
            limits=self.limits,
            executors=self.executors,
            closer=self.closer,
            holders=self.holders,
        )
        self.fd_server.serve_requests(servicer.serve_frame)
        self.control = ControlServer(
            inherited.control if inherited is not None else self._runtime().control_socket, servicer
        )
        self.metrics: MetricsServer | None = None
        if config.metrics.enabled:
            collector = DaemonCollector(self.ledger, self.sessions, self.models, self.registry)
            self.metrics = MetricsServer(config.metrics, runtime_dir, build_registry(collector))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None
        # Loop only: session clean-ups waiting for, or running on, a thread.
        self._clean_ups: set[asyncio.Task[None]] = set()
        self._stopping = False

    def _runtime(self) -> RuntimeDir:
        assert self.runtime is not None
        return self.runtime

    def _on_session_closed(self, session: Session) -> None:
        """On the loop, as a session ends: its clean-up may block (closing
        fds frees memory, /proc reads), so it runs on the calls executor,
        within its uid's share of the threads: a uid that ends many
        sessions at once waits for its own turns, not the others'."""
        assert self._loop is not None
        task = self._loop.create_task(self._clean_up_in_turn(session))
        self._clean_ups.add(task)
        task.add_done_callback(self._clean_ups.discard)

    async def _clean_up_in_turn(self, session: Session) -> None:
        assert self._loop is not None
        async with self.limits.thread(session.peer.uid):
            await self._loop.run_in_executor(self.executors.calls, self._clean_up, session)

    def _clean_up(self, session: Session) -> None:
        fields = {"session": session.id, "pid": session.peer.pid, "uid": session.peer.uid}
        released = 0
        # Each step on its own: one that fails must not leave the session's
        # buffers booked for ever.
        steps: list[tuple[str, Callable[[], object]]] = [
            ("grants", lambda: self.grants.owner_closed(session)),
            ("pools", lambda: self.pools.release_session(session)),
            ("models", lambda: self.models.release_session(session.id, session.peer.uid, session.peer.pid)),
        ]
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("session %d: clean-up of its %s failed", session.id, what, extra=fields)
        try:
            released = self.ledger.release_session(session)
        except Exception:
            log.exception("session %d: clean-up of its buffers failed", session.id, extra=fields)
        if released:
            log.info(
                "session %d: released %d bytes it still held",
                session.id,
                released,
                extra=fields | {"event": "session-released", "bytes": released},
            )

    async def _reap(self) -> None:
        """Free the charges of released buffers that clients no longer hold."""
        assert self._loop is not None
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            try:
                freed = await self._loop.run_in_executor(self.executors.calls, self.ledger.reap)
            except Exception:
                log.exception("reaping released buffers failed")
                continue
            if freed:
                log.debug("%d released buffer(s) no longer held: charges freed", freed)

    def _on_heaps_found(self, found: dict[str, HeapSpec]) -> None:
        self.registry.update(found)

    def _admit(self, peer: Peer) -> str | None:
        allowed = self.config.clients.allowed
        if allowed is None or allowed.allows(peer.uid, peer.gids):
            return None
        return f"uid {peer.uid} is not allowed to use dmabufd (see clients.allowed_uids/allowed_gids)"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.runtime is not None:
            self.runtime.acquire()
        try:
            limit = raise_fd_limit()
            self.discovery.start()
            self.reserve.start()
            if sys.version_info < (3, 12) and _has_pidfds():
                # Python 3.11 waits for each /proc helper on a thread of its
                # own, which the loop starts (with its nice); 3.12 and later
                # watch a pidfd on the loop where pidfd_open works, as this
                # watcher does.
                watcher = asyncio.PidfdChildWatcher()
                watcher.attach_loop(self._loop)
                asyncio.set_child_watcher(watcher)
            await self.holders.start()
            self.fd_server.start(self._loop)
            await self.control.start()
            if self.metrics is not None:
                self.metrics.start()
            # Sockets a service manager made keep the mode, owner and label
            # it gave them (the .rc or .socket unit is where to change them).
            if self.runtime is not None:
                for socket_path in (self.runtime.fd_socket, self.runtime.control_socket):
                    apply_socket_policy(socket_path, self.config.sockets.mode, self.config.sockets.group)
            # Last: the threads started above keep every CPU and the daemon's nice.
            self.placement.place_loop()
        except BaseException:
            self.reserve.close()
            if self.runtime is not None:
                self.runtime.release()
            raise
        self._reaper = self._loop.create_task(self._reap())
        # What start-up made (modules, grpc, protobuf descriptors: most of
        # the daemon's objects) lives as long as the daemon: out of the
        # collector's sight, an occasional full collection scans the calls'
        # garbage only, instead of pausing the loop for milliseconds.
        gc.freeze()
        heaps = ", ".join(spec.name for spec in self.registry.specs())
        if self.inherited is not None:
            control = f"{self.inherited.describe(self.inherited.control)}, relayed to @{self.control.private_address}"
            fds = self.inherited.describe(self.inherited.fd)
        else:
            control, fds = str(self._runtime().control_socket), str(self._runtime().fd_socket)
        log.info("dmabufd ready: control %s, fds %s, heaps: %s, fd limit %d", control, fds, heaps, limit)

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.info("dmabufd stopping")
        if self._reaper is not None:
            self._reaper.cancel()
        self.registry.close()  # ends WatchHeaps streams
        await self.control.stop(grace_s=2.0)
        if self.metrics is not None:
            self.metrics.stop()
        self.fd_server.stop()
        self.holders.stop_asking()  # releases still settling keep their charges
        await self.servicer.finish_frames()
        await self.holders.close(STOP_CLOSE_WAIT_S)
        self.discovery.stop()
        # The session clean-ups fd_server.stop() started, then the threads.
        await asyncio.gather(*self._clean_ups, return_exceptions=True)
        self.executors.calls.shutdown(wait=True)
        self.executors.loads.shutdown(wait=True)
        self.reserve.close()
        self.grants.close()
        self.models.close()
        self.pools.close()
        self.ledger.close()
        # Clients' files still closing: a close that does not return (a
        # hung FUSE server) must not hold up the stop.
        if not self.closer.settle(STOP_CLOSE_WAIT_S):
            log.warning("stopping with clients' files still closing after %.0f s", STOP_CLOSE_WAIT_S)
        if self.runtime is not None:
            self.runtime.release()
        log.info("dmabufd stopped")


def _has_pidfds() -> bool:
    """pidfd_open works: Linux 5.3 or later, and no seccomp filter refuses it
    (the fd server may not need it: SO_PEERPIDFD gives its pidfds)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True
