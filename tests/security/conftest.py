"""What every attack test of the security suite checks, and the means to
run attackers and victims.

An attack test asserts three things:

(a) what the attacker gets (status, bytes, hang-up);
(b) that a victim, another client in its own process and session (root,
    so never the attacker's uid), is served fast DURING the attack:
    allocate 4 KiB + release in a loop, p99 < 100 ms over >= 200 cycles
    (so that one stray spike of a loaded machine does not decide it), and
    no cycle over 1 s (Victim, assert_served);
(c) that once the attacker is gone the daemon's fd count is back to its
    baseline exactly and its RSS within 24 MiB of it (footprint,
    assert_recovered).

Attackers run in processes of their own as ROOTLESS_UID (tests/security/
actors.py holds their code), so the kernel checks their permissions as it
would for a real unprivileged client.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, FD_SOCKET_NAME
from tests.conftest import ROOTLESS_UID, RunningDaemon, assert_reachable_by_others, stop_daemon

REPO = Path(__file__).resolve().parents[2]
# The victim's latency bound, and the number of cycles it must complete.
VICTIM_P99_MS = 100.0
VICTIM_MIN_CALLS = 200
# No single cycle may stall this long: p99 alone would miss a victim that
# waits seconds once, then runs fast through the rest of the window.
VICTIM_MAX_MS = 1000.0
# How far above its baseline the daemon's RSS may stay after an attack.
RSS_SLACK_BYTES = 24 << 20

_LAUNCH = f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom tests.security import actors\nactors.main()\n"


# -- the daemon's footprint ------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_used(daemon: RunningDaemon, seconds: float) -> float:
    """CPU seconds the daemon burns over `seconds` of wall time."""
    before = cpu_seconds(daemon.pid)
    time.sleep(seconds)
    used = cpu_seconds(daemon.pid) - before
    print(f"daemon CPU over {seconds:.1f} s: {used:.2f} s")
    return used


def fd_links(pid: int) -> list[str]:
    """What each of a process's fds points at ("socket:[]", "/memfd:...",
    "anon_inode:[eventpoll]"; inode numbers dropped, to compare kinds)."""
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed while we looked
        links.append(re.sub(r"\[\d+\]", "[]", target))
    return links


@dataclass(frozen=True)
class Footprint:
    fds: int
    rss: int
    links: tuple[str, ...]


def footprint(daemon: RunningDaemon) -> Footprint:
    """The daemon's fds and RSS before an attack, once its gRPC server and
    threads have served a client (they allocate on first use)."""
    for _ in range(2):
        with daemon.connect() as warmup:
            warmup.allocate("4K").close()
    fds = daemon.settled_fd_count()
    return Footprint(fds, rss_bytes(daemon.pid), tuple(sorted(fd_links(daemon.pid))))


def assert_recovered(
    daemon: RunningDaemon,
    before: Footprint,
    *,
    timeout_s: float = 10.0,
    kept: Callable[[], int] = lambda: 0,
) -> None:
    """(c): the attacker is gone; the daemon is alive, its fd count returns
    to the baseline exactly (minus `kept()`, fds it legitimately keeps,
    e.g. a warm pool cache) and its RSS to within RSS_SLACK_BYTES."""
    assert daemon.process.poll() is None, f"dmabufd died (exit {daemon.process.returncode})"
    deadline = time.monotonic() + timeout_s
    while (fds := daemon.fd_count() - kept()) != before.fds and time.monotonic() < deadline:
        time.sleep(0.05)
    if fds == before.fds:
        fds = daemon.settled_fd_count() - kept()
    extra = collections.Counter(fd_links(daemon.pid)) - collections.Counter(before.links)
    missing = collections.Counter(before.links) - collections.Counter(fd_links(daemon.pid))
    assert fds == before.fds, (
        f"daemon holds {fds} fds, {before.fds} before the attack; extra: {dict(extra)}; missing: {dict(missing)}"
    )
    deadline = time.monotonic() + 5.0
    while (rss := rss_bytes(daemon.pid)) > before.rss + RSS_SLACK_BYTES and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"daemon after the attack: {fds} fds (baseline {before.fds}), RSS {(rss - before.rss) / 2**20:+.1f} MiB")
    assert rss <= before.rss + RSS_SLACK_BYTES, (
        f"daemon RSS {rss / 2**20:.1f} MiB, {before.rss / 2**20:.1f} MiB before the attack"
    )


class RssWatch:
    """Samples the daemon's RSS every 20 ms in a thread: the peak an attack
    drove it to, not only where it settled."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_bytes(self._pid))
            except (FileNotFoundError, ProcessLookupError):
                return

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- actors: client processes ---------------------------------------------------------


class Actor:
    """A client process running one function of actors.py as `uid`. It
    talks JSON lines: events on its stdout, commands on its stdin. It
    starts (interpreter, imports, uid switch) and then waits for go(). An
    actor that cannot run (for instance because uid 12345 cannot use the
    interpreter) fails the test with its stderr; it is never skipped."""

    def __init__(self, function: str, uid: int, kwargs: dict[str, Any]) -> None:
        self.function = function
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(uid), function, json.dumps(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read_events, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        loaded = self.expect("loaded")
        if loaded["uid"] != uid:
            raise self._trouble(f"runs as uid {loaded['uid']}, not {uid}")

    def go(self) -> Actor:
        """Let the actor do its work."""
        self.send("go")
        return self

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                self._stderr.append(f"(stdout) {line}")
        self._events.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    def _trouble(self, what: str) -> AssertionError:
        self.kill()
        stderr = "".join(self._stderr)[-4000:]
        return AssertionError(f"actor {self.function}: {what} (exit {self.process.returncode}):\n{stderr}")

    def poll(self, event: str, timeout_s: float) -> dict[str, Any] | None:
        """The next `event` this actor emits (other events are dropped), or
        None if it emits none within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got = self._events.get(timeout=remaining)
            except queue.Empty:
                break
            if got is None:
                self._events.put(None)  # stays at the end for the next caller
                self.process.wait(timeout=10)
                raise self._trouble(f"exited before {event!r}")
            if got.get("event") == event:
                return got
        return None

    def expect(self, event: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The next `event` this actor emits; it must come within `timeout_s`."""
        got = self.poll(event, timeout_s)
        if got is None:
            raise self._trouble(f"no {event!r} within {timeout_s:.0f} s")
        return got

    def send(self, command: str, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"command": command, **fields}) + "\n")
        self.process.stdin.flush()

    def result(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The actor's "result" event; it must then exit cleanly."""
        result = self.expect("result", timeout_s)
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            raise self._trouble("did not exit after its result") from None
        if code != 0:
            raise self._trouble("failed after its result")
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


Spawn = Callable[..., Actor]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """spawn(function, uid=ROOTLESS_UID, **kwargs): start an actor (it waits
    for go()); all are killed at the end of the test."""
    started: list[Actor] = []

    def start(function: str, uid: int = ROOTLESS_UID, **kwargs: Any) -> Actor:
        if uid != 0:
            assert_reachable_by_others()
        started.append(Actor(function, uid, kwargs))
        return started[-1]

    yield start
    for each in started:
        each.kill()


# -- the victim ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    calls: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    # The slowest cycles: [milliseconds, wall-clock time it started], to
    # find in the daemon's log what held the victim up.
    slowest: list[list[Any]]

    def __str__(self) -> str:
        errors = f", errors {self.errors}" if self.errors else ""
        slowest = ", ".join(f"{ms} ms at {at}" for ms, at in self.slowest)
        return (
            f"{self.calls} cycles, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms"
            f"{errors}; slowest: {slowest}"
        )


class Victim:
    """Another client, root in its own process: allocate("4K") + release in
    a loop between start() and stop(), timing each cycle."""

    def __init__(self, actor: Actor) -> None:
        self._actor = actor.go()
        try:
            self._actor.expect("ready")
        except AssertionError as error:
            raise AssertionError(f"the victim was starved before it could start: {error}") from None
        self._started = False

    def start(self) -> None:
        self._actor.send("start")
        self._actor.expect("started")
        self._started = True

    def stop(self, min_calls: int = VICTIM_MIN_CALLS, timeout_s: float = 8.0) -> Latency:
        """Stop once the victim has made `min_calls` cycles (a short attack
        is over by then; the window then also covers its aftermath), or
        after `timeout_s` (a starved victim counts its stuck cycle)."""
        assert self._started, "start() the victim first"
        deadline = time.monotonic() + timeout_s
        calls = 0
        while calls < min_calls:
            progress = self._actor.poll("progress", deadline - time.monotonic())
            if progress is None:
                break  # starved: the result says how badly
            calls = progress["calls"]
        self._actor.send("stop")
        result = self._actor.result()
        latency = Latency(
            result["calls"], result["p50_ms"], result["p99_ms"], result["max_ms"], result["errors"], result["slowest"]
        )
        print(f"victim during the attack: {latency}")
        return latency

    def sample(self, seconds: float) -> Latency:
        """Time cycles for `seconds` (and at least VICTIM_MIN_CALLS)."""
        self.start()
        time.sleep(seconds)
        return self.stop()


VictimOf = Callable[[RunningDaemon], Victim]


@pytest.fixture
def victim_of(spawn: Spawn) -> VictimOf:
    """victim_of(daemon): a connected, warmed-up victim (root)."""

    def make(daemon: RunningDaemon) -> Victim:
        actor = spawn("victim", uid=0, runtime_dir=str(daemon.runtime_dir))
        return Victim(actor)

    return make


def assert_served(latency: Latency) -> None:
    """(b): the victim was served, fast, while the attack ran."""
    assert latency.calls >= VICTIM_MIN_CALLS, f"the victim was starved: {latency}"
    assert not latency.errors, f"the victim's calls failed: {latency}"
    assert latency.p99_ms < VICTIM_P99_MS, f"the victim was slowed down: {latency}"
    assert latency.max_ms < VICTIM_MAX_MS, f"the victim stalled: {latency}"


# -- configuration and files ---------------------------------------------------------------


def limits(**values: float) -> str:
    """A [limits] table with these keys (the others keep their defaults)."""
    return "[limits]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory (0755, root's) every uid can reach, for the files an
    attack uses (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dmabufd-sec-files-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def attacker_dir(parent: Path, name: str) -> Path:
    """A directory the attacker's uid owns."""
    path = parent / name
    path.mkdir(mode=0o755)
    os.chown(path, ROOTLESS_UID, ROOTLESS_UID)
    return path


def write_file(path: Path, data: bytes, mode: int) -> bytes:
    path.write_bytes(data)
    path.chmod(mode)
    return data


def safetensors_bytes(tensors: dict[str, bytes]) -> bytes:
    """A safetensors file of U8 tensors with these bytes."""
    header: dict[str, object] = {}
    offset = 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(tensors.values())


# -- a daemon with a low fd limit -------------------------------------------------------------

# Runs dmabufd with RLIMIT_NOFILE set (soft and hard) to argv[1]; exec keeps the pid.
_WITH_FD_LIMIT = (
    "import os, resource, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def _wait_until_serving(daemon: RunningDaemon, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    control = daemon.runtime_dir / CONTROL_SOCKET_NAME
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"dmabufd exited with {daemon.process.returncode}:\n{daemon.log()}")
        if control.exists() and (daemon.runtime_dir / FD_SOCKET_NAME).exists():
            with grpc.insecure_channel(f"unix:{control}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    daemon.process.kill()
    raise RuntimeError(f"dmabufd did not become ready in {timeout_s} s:\n{daemon.log()}")


@pytest.fixture
def fd_limited_daemon(tmp_path: Path) -> Iterator[Callable[[str, int], RunningDaemon]]:
    """fd_limited_daemon(config_text, nofile): a daemon (public runtime dir)
    whose RLIMIT_NOFILE hard limit is `nofile`. Stopped at the end of the
    test; it must exit cleanly and log no traceback."""
    started: list[RunningDaemon] = []
    parents: list[Path] = []

    def start(config_text: str, nofile: int) -> RunningDaemon:
        parent = Path(tempfile.mkdtemp(prefix="dmabufd-sec-"))
        parent.chmod(0o755)
        parents.append(parent)
        runtime_dir = parent / "rt"
        config = parent / "rt.toml"
        config.write_text(config_text)
        log_path = tmp_path / f"fd-limited-{len(started)}.log"
        command = ["-m", "dmabufd", "--runtime-dir", str(runtime_dir), "--log-level", "debug", "--config", str(config)]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _WITH_FD_LIMIT, str(nofile), *command], stdout=log, stderr=subprocess.STDOUT
            )
        daemon = RunningDaemon(process, runtime_dir, log_path)
        started.append(daemon)
        _wait_until_serving(daemon)
        return daemon

    yield start
    problems = []
    for daemon in started:
        code = stop_daemon(daemon)
        log = daemon.log()
        if code != 0:
            problems.append(f"dmabufd exited with {code}:\n{log[-4000:]}")
        if (where := log.find("Traceback")) >= 0:
            problems.append(f"dmabufd logged a traceback ({len(log)} bytes of log):\n{log[where : where + 3000]}")
    for parent in parents:
        shutil.rmtree(parent, ignore_errors=True)
    assert not problems, "\n".join(problems)
