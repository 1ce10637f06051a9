"""Fixtures shared by the whole suite: a real daemon in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import dmabufd_client
from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, FD_SOCKET_NAME

START_TIMEOUT_S = 60.0


@dataclass
class RunningDaemon:
    process: subprocess.Popen[bytes]
    runtime_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self) -> dmabufd_client.Client:
        return dmabufd_client.connect(self.runtime_dir)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def helpers(self) -> set[int]:
        """Its /proc helpers (service/dmabufd/sessions/holders.py)."""
        found = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    command = cmdline.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.pid and b"dmabufd.sessions.holders" in command:
                found.add(int(name))
        return found

    def kill_helpers(self, timeout_s: float = 5.0) -> set[int]:
        """SIGKILL its /proc helpers (as an OOM kill would) and wait until
        the daemon has reaped them; the pids killed. It starts new ones as
        Releases find them dead."""
        killed = self.helpers()
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while self.helpers() & killed and time.monotonic() < deadline:
            time.sleep(0.05)
        return killed

    def wait_for_fd_count(self, expected: int, timeout_s: float = 10.0) -> int:
        """The daemon releases a dead client's fds asynchronously."""
        deadline = time.monotonic() + timeout_s
        while (count := self.fd_count()) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return count

    def settled_fd_count(self, quiet_s: float = 0.5) -> int:
        """The fd count once it has stopped changing (gRPC closes a finished
        connection's socket a moment after the client goes)."""
        count, stable_since = self.fd_count(), time.monotonic()
        while time.monotonic() - stable_since < quiet_s:
            time.sleep(0.05)
            if (now := self.fd_count()) != count:
                count, stable_since = now, time.monotonic()
        return count


def start_daemon(
    runtime_dir: Path,
    config_text: str | None,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    wrapper: Sequence[str] = (),
) -> RunningDaemon:
    """env, pass_fds, wrapper (a command that execs its arguments): how a
    service manager would start it (tests/integration/test_socket_activation.py)."""
    args = [*wrapper, sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime_dir), "--log-level", "debug"]
    if config_text is not None:
        config_path = runtime_dir.parent / f"{runtime_dir.name}.toml"
        config_path.write_text(config_text)
        args += ["--config", str(config_path)]
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child for its lifetime
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)
    log.close()
    daemon = RunningDaemon(process, runtime_dir, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dmabufd exited with {process.returncode}:\n{daemon.log()}")
        if (runtime_dir / CONTROL_SOCKET_NAME).exists() and (runtime_dir / FD_SOCKET_NAME).exists():
            # The health service needs no session, so admission rules do not matter here.
            with grpc.insecure_channel(f"unix:{runtime_dir / CONTROL_SOCKET_NAME}") as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return daemon
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"dmabufd did not become ready in {START_TIMEOUT_S} s:\n{daemon.log()}")


def stop_daemon(daemon: RunningDaemon) -> int:
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
            raise AssertionError(f"dmabufd ignored SIGTERM:\n{daemon.log()}") from None
    return daemon.process.returncode


DaemonFactory = Callable[..., RunningDaemon]

# A uid no account on the test machine has: an unprivileged client.
ROOTLESS_UID = 12345


def assert_reachable_by_others() -> None:
    """A client that drops to ROOTLESS_UID still imports modules lazily from
    the checkout and the venv: every directory above them must be
    searchable by other users. Fail with the reason, never skip."""
    import sysconfig

    for path in (Path(__file__).resolve().parent.parent, Path(sysconfig.get_paths()["purelib"])):
        for directory in (path, *path.parents):
            if not directory.stat().st_mode & 0o001:
                raise AssertionError(
                    f"{directory} is not searchable by other users (mode {directory.stat().st_mode & 0o777:o}), "
                    f"so a client running as uid {ROOTLESS_UID} cannot import from {path}: "
                    f"chmod o+x {directory}, or put the checkout somewhere public"
                )


def run_as_rootless_client(
    daemon: RunningDaemon, body: str, timeout_s: float = 60, groups: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    """Run `body` in a child process that drops to ROOTLESS_UID, with only
    the supplementary `groups`, and has connected to `daemon` as `c` (needs
    root, and a public runtime dir)."""
    assert_reachable_by_others()
    script = (
        "import os, dmabufd_client\n"
        f"os.setgroups({list(groups)!r}); os.setgid({ROOTLESS_UID}); os.setuid({ROOTLESS_UID})\n"
        f"c = dmabufd_client.connect({str(daemon.runtime_dir)!r})\n"
    ) + body
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s, check=False
    )


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start daemons with a given TOML config; all are stopped (and must
    exit cleanly) at the end of the test."""
    started: list[RunningDaemon] = []
    public_dirs: list[Path] = []

    def start(
        config_text: str | None = None,
        name: str = "rt",
        public: bool = False,
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        wrapper: Sequence[str] = (),
    ) -> RunningDaemon:
        """public: put the runtime dir where other uids can reach it
        (pytest's tmp_path is private to its user)."""
        parent = tmp_path
        if public:
            parent = Path(tempfile.mkdtemp(prefix="dmabufd-test-"))
            parent.chmod(0o755)
            public_dirs.append(parent)
        daemon = start_daemon(
            parent / name, config_text, tmp_path / f"{name}.log", env=env, pass_fds=pass_fds, wrapper=wrapper
        )
        started.append(daemon)
        return daemon

    yield start
    for directory in public_dirs:
        shutil.rmtree(directory, ignore_errors=True)
    for daemon in started:
        code = stop_daemon(daemon)
        assert code == 0, f"dmabufd exited with {code}:\n{daemon.log()}"
        assert "Traceback" not in daemon.log(), daemon.log()


@pytest.fixture
def daemon(daemon_factory: DaemonFactory) -> RunningDaemon:
    """A daemon with the built-in defaults (on this machine: memfd only)."""
    return daemon_factory()


@pytest.fixture
def client(daemon: RunningDaemon) -> Iterator[dmabufd_client.Client]:
    with daemon.connect() as connected:
        yield connected
