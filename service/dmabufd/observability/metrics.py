"""Metrics in the Prometheus text format, opt-in (config [metrics]).

Two kinds of numbers:

- Events, counted where they happen, whether or not metrics are served
  (an increment under prometheus_client's own lock): failed calls by reason
  (api/base.py), quota denials by uid, and loads with their bytes and
  seconds (api/loading.py). Module-level, since a process runs one daemon.
- State, read when a scraper asks (DaemonCollector): buffers and bytes per
  heap and per uid, what each uid is charged and its quota, sessions,
  lingering buffers, resident models, and the ledger's running totals
  (allocations, releases, denials). Nothing is copied or kept between
  scrapes.

MetricsServer serves GET /metrics on a loopback TCP address or a Unix
socket, from one thread of its own ("metrics", CONCURRENCY.md): one
request at a time, each allowed REQUEST_TIMEOUT_S to arrive, so a scraper
that never sends can delay other scrapes, never a client of the daemon.
A scrape takes the ledger's, session table's, model cache's and heap
registry's locks one after the other, each for one copy, never nested.

Every uid's usage is visible to whoever can scrape: hence loopback or a
Unix socket (mode metrics.unix_mode, default 0600) only.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from dmabufd.config import MetricsConfig
from dmabufd.heaps.registry import HeapRegistry
from dmabufd.loading.models import ModelCache
from dmabufd.sessions.ledger import Ledger
from dmabufd.sessions.session import SessionTable

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 5.0
METRICS_PATH = "/metrics"

# -- events -------------------------------------------------------------

# No <name>_created series beside each counter: the process's start time
# (process_start_time_seconds) says the same for all of them.
disable_created_metrics()  # type: ignore[no-untyped-call]

ERRORS = Counter(
    "dmabufd_errors",
    "Failed calls, by ErrorInfo reason and gRPC status code",
    ["reason", "code"],
    registry=None,
)
QUOTA_DENIALS = Counter(
    "dmabufd_quota_denials",
    "Calls refused because they would pass a memory quota (reason QUOTA_EXCEEDED), by uid",
    ["uid"],
    registry=None,
)
LOADS = Counter(
    "dmabufd_loads",
    "Loads that read a file into buffers (LoadFile, and LoadModel when not already resident), by method",
    ["method"],
    registry=None,
)
LOAD_BYTES = Counter(
    "dmabufd_load_bytes", "Bytes read from files into buffers by those loads, by method", ["method"], registry=None
)
LOAD_SECONDS = Counter(
    "dmabufd_load_seconds",
    "Wall time of those loads (allocation and I/O): bytes over seconds is their throughput",
    ["method"],
    registry=None,
)
_EVENTS = (ERRORS, QUOTA_DENIALS, LOADS, LOAD_BYTES, LOAD_SECONDS)


def count_error(reason: str, code: grpc.StatusCode, uid: int | None) -> None:
    """A call failed with `reason` (api/base.py's _abort and _internal)."""
    ERRORS.labels(reason=reason, code=code.name).inc()
    if reason == "QUOTA_EXCEEDED":
        QUOTA_DENIALS.labels(uid="unknown" if uid is None else str(uid)).inc()


def count_load(method: str, nbytes: int, seconds: float) -> None:
    """A load read `nbytes` of a file into buffers in `seconds` (wall)."""
    LOADS.labels(method=method).inc()
    LOAD_BYTES.labels(method=method).inc(nbytes)
    LOAD_SECONDS.labels(method=method).inc(max(seconds, 0.0))


# -- state --------------------------------------------------------------


class DaemonCollector:
    """The daemon's state, read at scrape time (the metrics thread)."""

    def __init__(self, ledger: Ledger, sessions: SessionTable, models: ModelCache, registry: HeapRegistry) -> None:
        self._ledger = ledger
        self._sessions = sessions
        self._models = models
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        heaps = {spec.name: spec for spec in self._registry.specs()}
        records = self._ledger.all_buffers()
        sessions = self._sessions.sessions()

        present = GaugeMetricFamily(
            "dmabufd_heap", "Heaps present (always 1), by heap and backend", labels=["heap", "backend"]
        )
        for name, spec in sorted(heaps.items()):
            present.add_metric([name, spec.kind.name.lower()], 1)
        yield present

        per_heap: dict[str, list[int]] = {name: [0, 0] for name in heaps}
        per_uid: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
        for record in records:
            for entry in (per_heap.setdefault(record.heap, [0, 0]), per_uid[record.uid]):
                entry[0] += 1
                entry[1] += record.size
        buffers = GaugeMetricFamily("dmabufd_buffers", "Buffers booked to sessions now, by heap", labels=["heap"])
        nbytes = GaugeMetricFamily("dmabufd_buffer_bytes", "Bytes of those buffers, by heap", labels=["heap"])
        for heap, (count, size) in sorted(per_heap.items()):
            buffers.add_metric([heap], count)
            nbytes.add_metric([heap], size)
        yield buffers
        yield nbytes

        by_uid = collections.Counter(session.peer.uid for session in sessions)
        uids = sorted(set(per_uid) | set(by_uid))
        uid_buffers = GaugeMetricFamily("dmabufd_uid_buffers", "Buffers booked to a uid's sessions now", labels=["uid"])
        uid_bytes = GaugeMetricFamily("dmabufd_uid_buffer_bytes", "Bytes of those buffers", labels=["uid"])
        charged = GaugeMetricFamily(
            "dmabufd_uid_charged_bytes",
            "Bytes charged against a uid's quota: booked, lingering and resident-model buffers",
            labels=["uid"],
        )
        charged_buffers = GaugeMetricFamily(
            "dmabufd_uid_charged_buffers", "Buffers charged against a uid's quota", labels=["uid"]
        )
        quota = GaugeMetricFamily("dmabufd_uid_quota_bytes", "A uid's memory quota", labels=["uid"])
        session_count = GaugeMetricFamily("dmabufd_sessions", "Sessions open now, by uid", labels=["uid"])
        for uid in uids:
            label = [str(uid)]
            count, size = per_uid.get(uid, (0, 0))
            usage = self._ledger.usage_of(uid)
            uid_buffers.add_metric(label, count)
            uid_bytes.add_metric(label, size)
            charged.add_metric(label, usage.bytes)
            charged_buffers.add_metric(label, usage.buffers)
            quota.add_metric(label, self._ledger.quota(uid).max_bytes)
            session_count.add_metric(label, by_uid.get(uid, 0))
        yield from (uid_buffers, uid_bytes, charged, charged_buffers, quota, session_count)

        totals = self._ledger.totals()
        yield CounterMetricFamily("dmabufd_allocations", "Buffers allocated and booked", value=totals.allocations)
        yield CounterMetricFamily("dmabufd_releases", "Buffers released from the books", value=totals.releases)
        yield CounterMetricFamily(
            "dmabufd_denials",
            "Calls refused by policy or a limit (PERMISSION_DENIED, RESOURCE_EXHAUSTED)",
            value=totals.denials,
        )
        yield GaugeMetricFamily(
            "dmabufd_lingering_buffers",
            "Released buffers still charged: a client process holds them",
            value=totals.lingering,
        )
        yield CounterMetricFamily("dmabufd_sessions_opened", "Sessions opened", value=self._sessions.opened)
        yield CounterMetricFamily("dmabufd_sessions_closed", "Sessions closed", value=self._sessions.closed)
        models, model_bytes = self._models.resident()
        yield GaugeMetricFamily("dmabufd_models", "Resident shared models (LoadModel)", value=models)
        yield GaugeMetricFamily("dmabufd_model_bytes", "Bytes of resident shared models", value=model_bytes)


def build_registry(collector: DaemonCollector) -> CollectorRegistry:
    """What a scrape returns: the events, the daemon's state, and the
    process's own numbers (CPU, resident memory, open fds: process_*)."""
    registry = CollectorRegistry()
    for counter in _EVENTS:
        registry.register(counter)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


# -- serving ------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    timeout = REQUEST_TIMEOUT_S
    server: _TcpServer | _UnixServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in (METRICS_PATH, "/"):
            self.send_error(404, f"metrics are at {METRICS_PATH}")
            return
        try:
            body = generate_latest(self.server.metrics)
        except Exception:
            log.exception("collecting metrics failed")
            self.send_error(500, "collecting metrics failed; see the daemon's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # (A Unix socket's peer has no address: never ask for one.)
        log.debug("metrics: " + format, *args)


class _TcpServer(socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], metrics: CollectorRegistry) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.metrics = metrics
        super().__init__(address, _Handler)


class _UnixServer(socketserver.UnixStreamServer):
    def __init__(self, path: Path, mode: int, metrics: CollectorRegistry) -> None:
        self.metrics = metrics
        super().__init__(str(path), _Handler, bind_and_activate=False)
        try:
            self.server_bind()
            os.chmod(path, mode)  # before listen(): nobody connects with the wrong mode
            self.server_activate()
        except BaseException:
            self.server_close()
            raise


class MetricsServer:
    """Serves `registry` where `config` says, from the "metrics" thread."""

    def __init__(self, config: MetricsConfig, runtime_dir: Path, registry: CollectorRegistry) -> None:
        self._config = config
        self._registry = registry
        self._unix = runtime_dir / config.unix if config.unix is not None else None
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        if self._unix is not None:
            return f"unix:{self._unix}"
        assert self._config.listen is not None
        host, port = self._config.listen
        return f"http://[{host}]:{port}{METRICS_PATH}" if ":" in host else f"http://{host}:{port}{METRICS_PATH}"

    def start(self) -> None:
        """Listen, and serve from the metrics thread. OSError (the address
        is taken, say) names the metrics address."""
        try:
            if self._unix is not None:
                _remove_stale_socket(self._unix)
                self._server = _UnixServer(self._unix, self._config.unix_mode, self._registry)
            else:
                assert self._config.listen is not None
                self._server = _TcpServer(self._config.listen, self._registry)
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise OSError(error.errno, f"metrics on {self.where}: {reason}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics on %s", self.where)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()  # waits for serve_forever to return (a scrape in progress ends first)
        self._server.server_close()
        if self._unix is not None:
            self._unix.unlink(missing_ok=True)
        self._server = None


def _remove_stale_socket(path: Path) -> None:
    """A socket left by a daemon that died; anything else there is not ours."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"metrics.unix: {path} exists and is not a socket")
    path.unlink()
