"""The daemon: builds the places (heaps, sessions, transport, api) and
runs them. Start-up order makes each step's dependencies ready first;
shut-down runs in reverse so no call sees a half-dismantled daemon."""

from __future__ import annotations

import logging
import resource
import threading
from pathlib import Path

from dmabufd.api.servicer import BufferService
from dmabufd.broker import BufferBroker
from dmabufd.config import Config
from dmabufd.heaps.backend import HeapSpec
from dmabufd.heaps.discovery import HeapDiscovery
from dmabufd.heaps.registry import HeapRegistry
from dmabufd.loading.loader import FileLoader
from dmabufd.loading.models import ModelCache
from dmabufd.loading.probe import supported_methods
from dmabufd.pools.pool import PoolTable
from dmabufd.sessions.grants import GrantTable
from dmabufd.sessions.ledger import Ledger
from dmabufd.sessions.session import Peer, Session, SessionTable
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


class Daemon:
    def __init__(self, config: Config, runtime_dir: Path) -> None:
        self.config = config
        self.runtime = RuntimeDir(runtime_dir)
        self.registry = HeapRegistry(config.heaps, probe=supported_methods)
        self.ledger = Ledger(config)
        self.sessions = SessionTable(on_close=self._on_session_closed)
        self.broker = BufferBroker(config, self.registry, self.ledger)
        self.loader = FileLoader(config.loading, self.broker)
        self.models = ModelCache(self.loader, config.loading.model_budget_bytes, self.ledger.new_ids)
        self.pools = PoolTable(self.broker, self.ledger, layout, config.loading.pool_recycle_budget_bytes)
        self.grants = GrantTable()
        self.discovery = HeapDiscovery(config.discovery, self._on_heaps_found)
        self.fd_server = FdServer(self.runtime.fd_socket, self.sessions, self._admit)
        servicer = BufferService(
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
        )
        self.control = ControlServer(self.runtime.control_socket, servicer)
        self._stopping = threading.Event()

    def _on_session_closed(self, session: Session) -> None:
        self.grants.owner_closed(session)
        self.pools.release_session(session)
        self.models.release_session(session.id)
        released = self.ledger.release_session(session)
        if released:
            log.info("session %d: released %d bytes it still held", session.id, released)

    def _on_heaps_found(self, found: dict[str, HeapSpec]) -> None:
        self.registry.update(found)

    def _admit(self, peer: Peer) -> str | None:
        allowed = self.config.clients.allowed
        if allowed is None or allowed.allows(peer.uid, peer.gids):
            return None
        return f"uid {peer.uid} is not allowed to use dmabufd (see clients.allowed_uids/allowed_gids)"

    def start(self) -> None:
        self.runtime.acquire()
        try:
            limit = raise_fd_limit()
            self.discovery.start()
            self.fd_server.start()
            self.control.start()
            for socket_path in (self.runtime.fd_socket, self.runtime.control_socket):
                apply_socket_policy(socket_path, self.config.sockets.mode, self.config.sockets.group)
        except BaseException:
            self.runtime.release()
            raise
        heaps = ", ".join(spec.name for spec in self.registry.specs())
        log.info(
            "dmabufd ready: control %s, fds %s, heaps: %s, fd limit %d",
            self.runtime.control_socket,
            self.runtime.fd_socket,
            heaps,
            limit,
        )

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("dmabufd stopping")
        self.registry.close()  # ends WatchHeaps streams
        self.control.stop(grace_s=2.0)
        self.fd_server.stop()
        self.discovery.stop()
        self.models.close()
        self.pools.close()
        self.runtime.release()
        log.info("dmabufd stopped")
