"""Sockets from a service manager: Android's init (ANDROID_SOCKET_<name>)
and systemd (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES), against the real
daemon; and the init .rc and systemd units that pass them."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dmabufd_client
from dmabufd.transport.relay import ControlRelay
from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, FD_SOCKET_NAME, LOCK_FILE_NAME
from dmabufd_common.paths import (
    ANDROID_SOCKET_DIR,
    ANDROID_SOCKET_ENV_PREFIX,
    CONTROL_ACTIVATION_NAME,
    FD_ACTIVATION_NAME,
    socket_paths,
)
from tests.conftest import DaemonFactory, stop_daemon

REPO = Path(__file__).resolve().parents[2]
CONTROL_VAR = ANDROID_SOCKET_ENV_PREFIX + CONTROL_ACTIVATION_NAME
FD_VAR = ANDROID_SOCKET_ENV_PREFIX + FD_ACTIVATION_NAME
SYSTEMD_NAMES = f"{CONTROL_ACTIVATION_NAME}:{FD_ACTIVATION_NAME}"
MANAGER_VARIABLES = (CONTROL_VAR, FD_VAR, "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
O_CLOEXEC_OCTAL = 0o2000000

# What systemd does between fork and exec: put the sockets at fds 3 and 4
# and say the pid they are for, which is only known in the child.
SYSTEMD_EXEC = (
    "import os, sys\n"
    "for target, source in ((3, int(sys.argv[1])), (4, int(sys.argv[2]))):\n"
    "    os.dup2(source, target)\n"
    "    os.close(source)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


def listening(path: Path, kind: socket.SocketKind, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    if listen:
        sock.listen(16)
    return sock


def high_fd(fd: int, minimum: int = 10) -> int:
    """A duplicate at `minimum` or above (so placing fds at 3 and 4
    clobbers none of them, or so no child reuses its number)."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)


@dataclass
class Handover:
    """What a test passes to the daemon: environment, fds and a wrapper.
    The test's own copies of the fds are closed once the daemon has them."""

    env: dict[str, str] = field(
        default_factory=lambda: {k: v for k, v in os.environ.items() if k not in MANAGER_VARIABLES}
    )
    fds: list[int] = field(default_factory=list)
    wrapper: list[str] = field(default_factory=list)
    keep: list[socket.socket] = field(default_factory=list)

    def pass_socket(self, sock: socket.socket) -> int:
        self.keep.append(sock)
        self.fds.append(sock.fileno())
        return sock.fileno()

    def pass_file(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def like_init(self, control: int, fds: int) -> Handover:
        self.env |= {CONTROL_VAR: str(control), FD_VAR: str(fds)}
        return self

    def like_systemd(self, control: socket.socket, fds: socket.socket, names: str = SYSTEMD_NAMES) -> Handover:
        sources = [high_fd(control.fileno()), high_fd(fds.fileno())]
        self.fds += sources
        self.keep += [control, fds]
        self.env |= {"LISTEN_FDS": "2", "LISTEN_FDNAMES": names}
        self.wrapper = [sys.executable, "-c", SYSTEMD_EXEC, *map(str, sources)]
        return self

    def close(self) -> None:
        owned = {sock.fileno() for sock in self.keep}
        for fd in self.fds:
            if fd not in owned:
                os.close(fd)
        for sock in self.keep:
            sock.close()
        self.keep.clear()
        self.fds.clear()


@pytest.fixture
def handover() -> Iterator[Handover]:
    made = Handover()
    yield made
    made.close()


def runtime_sockets(tmp_path: Path) -> tuple[Path, socket.socket, socket.socket]:
    """Listening sockets at the runtime directory's paths, as a service
    manager would make them, so the client finds them by directory."""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    control = listening(runtime / CONTROL_SOCKET_NAME, socket.SOCK_STREAM)
    fds = listening(runtime / FD_SOCKET_NAME, socket.SOCK_SEQPACKET)
    return runtime, control, fds


def cloexec(pid: int, fd: int) -> bool:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines())
    return bool(int(fields["flags"].strip(), 8) & O_CLOEXEC_OCTAL)


def serves_a_client(daemon_dir: Path, connect: Callable[[], dmabufd_client.Client]) -> None:
    with connect() as client, client.allocate(4096, name="activated") as buffer:
        assert buffer.size == 4096
        os.fstat(buffer.fileno())
    assert LOCK_FILE_NAME not in os.listdir(daemon_dir), "inherited sockets: no lock, no runtime directory use"


# -- serving on inherited sockets ----------------------------------------------


def test_init_sockets_serve_a_real_client(daemon_factory: DaemonFactory, tmp_path: Path, handover: Handover) -> None:
    runtime, control, fds = runtime_sockets(tmp_path)
    inodes = {path: path.stat().st_ino for path in runtime.iterdir()}
    handover.like_init(handover.pass_socket(control), handover.pass_socket(fds))
    daemon = daemon_factory(env=handover.env, pass_fds=handover.fds)
    handover.close()  # the daemon's copies alone from here, as after init forks

    serves_a_client(runtime, daemon.connect)
    log = daemon.log()
    assert f"control {runtime / CONTROL_SOCKET_NAME} (from init), relayed to @dmabufd-control-" in log
    assert f"fds {runtime / FD_SOCKET_NAME} (from init)" in log
    assert stop_daemon(daemon) == 0
    assert {path: path.stat().st_ino for path in runtime.iterdir()} == inodes, (
        "the daemon must neither rebind nor unlink sockets it did not create"
    )


def test_systemd_sockets_serve_a_real_client(daemon_factory: DaemonFactory, tmp_path: Path, handover: Handover) -> None:
    runtime, control, fds = runtime_sockets(tmp_path)
    handover.like_systemd(control, fds)
    daemon = daemon_factory(env=handover.env, pass_fds=handover.fds, wrapper=handover.wrapper)
    handover.close()

    serves_a_client(runtime, daemon.connect)
    assert "(from systemd)" in daemon.log()
    assert cloexec(daemon.pid, 3), "taken fds must not leak into children"
    assert cloexec(daemon.pid, 4)
    assert stop_daemon(daemon) == 0
    assert sorted(os.listdir(runtime)) == sorted([CONTROL_SOCKET_NAME, FD_SOCKET_NAME])


def test_listen_pid_of_another_process_is_ignored(daemon_factory: DaemonFactory, handover: Handover) -> None:
    # As sd_listen_fds(): the variables were meant for someone else (pid 1
    # here), so fds 3 and 4 are not touched and the daemon makes its own.
    handover.env |= {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": SYSTEMD_NAMES}
    daemon = daemon_factory(env=handover.env)
    assert "LISTEN_PID=1 is not this process" in daemon.log()
    with daemon.connect() as client, client.allocate(4096) as buffer:
        assert buffer.size == 4096
    assert LOCK_FILE_NAME in os.listdir(daemon.runtime_dir), "its own sockets, in its locked runtime directory"


def test_relay_keeps_bytes_order_and_half_closes() -> None:
    """The relay in front of gRPC: several clients at once, more than its
    buffers hold (so it must pause and resume), then a half-close that the
    far side still answers."""

    async def run() -> list[bytes]:
        tag = f"dmabufd-test-relay-{os.getpid()}"

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write(b"after eof")
            await writer.drain()
            writer.close()

        upstream = await asyncio.start_unix_server(echo, path=f"\0{tag}-up")
        front = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        front.bind(f"\0{tag}-front")
        front.listen()
        relay = ControlRelay(front, f"\0{tag}-up")
        await relay.start()

        async def client() -> bytes:
            reader, writer = await asyncio.open_unix_connection(f"\0{tag}-front")

            async def send() -> None:
                for start in range(0, len(payload), 1 << 18):
                    writer.write(payload[start : start + (1 << 18)])
                    await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())  # the echo only goes on while read
            received = await reader.read()
            await sending
            writer.close()
            return received

        try:
            return await asyncio.wait_for(asyncio.gather(*(client() for _ in range(3))), timeout=60)
        finally:
            await relay.close()
            upstream.close()

    payload = os.urandom(4 << 20)
    for received in asyncio.run(run()):
        assert received == payload + b"after eof"


# -- refusing what cannot be served on --------------------------------------------


def refusal(runtime: Path, handover: Handover) -> subprocess.CompletedProcess[str]:
    command = [*handover.wrapper, sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime)]
    try:
        return subprocess.run(
            command, env=handover.env, pass_fds=handover.fds, capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        handover.close()


def not_a_socket(tmp_path: Path, handover: Handover) -> str:
    _, _, fds = runtime_sockets(tmp_path)
    regular = os.open(tmp_path / "regular", os.O_RDWR | os.O_CREAT, 0o600)
    handover.like_init(handover.pass_file(regular), handover.pass_socket(fds))
    return f"{CONTROL_VAR}='{regular}': fd {regular} is not a socket (it is a regular file)"


def stream_for_seqpacket(tmp_path: Path, handover: Handover) -> str:
    runtime, control, _ = runtime_sockets(tmp_path)
    stream = listening(runtime / "wrong", socket.SOCK_STREAM)
    handover.like_init(handover.pass_socket(control), handover.pass_socket(stream))
    return "is a SOCK_STREAM socket, but dmabufd needs SOCK_SEQPACKET there: use type seqpacket+listen"


def not_listening(tmp_path: Path, handover: Handover) -> str:
    runtime, control, _ = runtime_sockets(tmp_path)
    bound = listening(runtime / "bound", socket.SOCK_SEQPACKET, listen=False)
    handover.like_init(handover.pass_socket(control), handover.pass_socket(bound))
    return f"{FD_VAR}='{bound.fileno()}': fd {bound.fileno()} is not a listening socket (SO_ACCEPTCONN is 0)"


def garbage_number(tmp_path: Path, handover: Handover) -> str:
    _, _, fds = runtime_sockets(tmp_path)
    handover.env |= {CONTROL_VAR: "seven", FD_VAR: str(handover.pass_socket(fds))}
    return f"{CONTROL_VAR}='seven' is not a file descriptor number"


def closed_fd(tmp_path: Path, handover: Handover) -> str:
    _, _, fds = runtime_sockets(tmp_path)
    handover.like_init(999, handover.pass_socket(fds))
    return f"{CONTROL_VAR}='999': fd 999 cannot be used: Bad file descriptor"


def only_one_socket(tmp_path: Path, handover: Handover) -> str:
    _, control, _ = runtime_sockets(tmp_path)
    handover.env[CONTROL_VAR] = str(handover.pass_socket(control))
    return f"init passed {CONTROL_VAR}='{control.fileno()}' but not the socket named {FD_ACTIVATION_NAME!r}"


def same_fd_twice(tmp_path: Path, handover: Handover) -> str:
    _, control, _ = runtime_sockets(tmp_path)
    fd = handover.pass_socket(control)
    handover.like_init(fd, fd)
    return f"{CONTROL_VAR}='{fd}' and {FD_VAR}='{fd}' are the same fd; dmabufd needs two sockets"


def names_count_mismatch(tmp_path: Path, handover: Handover) -> str:
    _, control, fds = runtime_sockets(tmp_path)
    handover.like_systemd(control, fds, names=CONTROL_ACTIVATION_NAME)
    return f"LISTEN_FDNAMES='{CONTROL_ACTIVATION_NAME}' names 1 socket(s) but LISTEN_FDS=2"


def unnamed(tmp_path: Path, handover: Handover) -> str:
    _, control, fds = runtime_sockets(tmp_path)
    handover.like_systemd(control, fds)
    del handover.env["LISTEN_FDNAMES"]
    return (
        "LISTEN_FDNAMES is not set: name the sockets in the .socket units "
        f"(FileDescriptorName={CONTROL_ACTIVATION_NAME} and FileDescriptorName={FD_ACTIVATION_NAME})"
    )


@pytest.mark.parametrize(
    "bad_input",
    [
        not_a_socket,
        stream_for_seqpacket,
        not_listening,
        garbage_number,
        closed_fd,
        only_one_socket,
        same_fd_twice,
        names_count_mismatch,
        unnamed,
    ],
)
def test_unusable_sockets_are_refused_with_the_reason(
    tmp_path: Path, handover: Handover, bad_input: Callable[[Path, Handover], str]
) -> None:
    expected = bad_input(tmp_path, handover)
    result = refusal(tmp_path / "rt", handover)
    assert result.returncode == 2, result.stderr
    assert "cannot use the sockets the service manager passed: " in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_hand_started_daemon_leaves_sockets_that_someone_serves(tmp_path: Path, handover: Handover) -> None:
    # The sockets of a daemon that init or systemd started, in a directory
    # without a lock: a second daemon must not take them for stale.
    runtime, control, fds = runtime_sockets(tmp_path)
    handover.keep += [control, fds]
    result = subprocess.run(
        [sys.executable, "-m", "dmabufd", "--runtime-dir", str(runtime)],
        env=handover.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"something listens on {runtime / CONTROL_SOCKET_NAME} without holding" in result.stderr
    assert sorted(os.listdir(runtime)) == sorted([CONTROL_SOCKET_NAME, FD_SOCKET_NAME]), "left as they were"


# -- the environment ---------------------------------------------------------------

CHILD_VIEW = (
    "import os, subprocess, sys\n"
    "from dmabufd.transport.activation import take_inherited_sockets\n"
    "taken = take_inherited_sockets()\n"
    "assert taken is not None and taken.manager == 'init'\n"
    "print(subprocess.run(['env'], capture_output=True, text=True, check=True).stdout)\n"
    "print('FDS', subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.listdir(\"/proc/self/fd\")))'],\n"
    "      close_fds=False, capture_output=True, text=True, check=True).stdout)\n"
)


def test_children_inherit_neither_the_variables_nor_the_fds(tmp_path: Path, handover: Handover) -> None:
    _, control, fds = runtime_sockets(tmp_path)
    handover.keep += [control, fds]
    # High numbers, which no child reaches by opening files of its own.
    handover.like_init(
        handover.pass_file(high_fd(control.fileno(), 100)), handover.pass_file(high_fd(fds.fileno(), 100))
    )
    # Variables meant for another process are dropped all the same.
    handover.env |= {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "other"}
    passed = [str(fd) for fd in handover.fds]
    result = subprocess.run(
        [sys.executable, "-c", CHILD_VIEW],
        env=handover.env,
        pass_fds=handover.fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    handover.close()
    assert result.returncode == 0, result.stderr
    names = {line.split("=", 1)[0] for line in result.stdout.splitlines() if "=" in line}
    assert not names & set(MANAGER_VARIABLES)
    child_fds = result.stdout.split("FDS", 1)[1]
    assert not any(f"'{fd}'" in child_fds for fd in passed), child_fds


# -- the init .rc and the systemd units ----------------------------------------------


@dataclass
class RcService:
    options: list[tuple[list[str], list[str]]]  # (tokens, the comment lines just above)

    def lines(self, keyword: str) -> list[list[str]]:
        return [tokens for tokens, _ in self.options if tokens[0] == keyword]


def parse_rc(text: str) -> tuple[RcService, list[str]]:
    """The one service of the .rc, and every action line (init's syntax:
    sections start at `service` or `on`; options follow, indented)."""
    service: RcService | None = None
    actions: list[str] = []
    comments: list[str] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            comments = []
            continue
        if line.startswith("#"):
            comments.append(line.lstrip("# "))
            continue
        tokens = shlex.split(line)
        if tokens[0] in ("service", "on", "import"):
            section = tokens[0]
            if section == "service":
                assert service is None, "one service per .rc"
                service = RcService([])
            else:
                actions.append(line)
        elif section == "service":
            assert service is not None
            service.options.append((tokens, comments))
        else:
            actions.append(line)
        comments = []
    assert service is not None, "no service in the .rc"
    return service, actions


def test_rc_is_what_init_accepts_and_matches_the_code() -> None:
    service, actions = parse_rc((REPO / "android" / "dmabufd.rc").read_text())
    (restart,) = service.lines("restart_period")
    assert int(restart[1]) >= 5, "init refuses a restart_period under 5"
    sockets = {tokens[1]: tokens[2:] for tokens in service.lines("socket")}
    assert set(sockets) == {CONTROL_ACTIVATION_NAME, FD_ACTIVATION_NAME}
    assert sockets[CONTROL_ACTIVATION_NAME][0] == "stream+listen"
    assert sockets[FD_ACTIVATION_NAME][0] == "seqpacket+listen"
    for name, (_, perm, user, group, *_) in sockets.items():
        assert re.fullmatch(r"0[0-7]{3}", perm), f"socket {name}: mode {perm}"
        assert user
        assert group
        assert (ANDROID_SOCKET_DIR / name) in (
            socket_paths(ANDROID_SOCKET_DIR).control,
            socket_paths(ANDROID_SOCKET_DIR).fd,
        )
    assert service.lines("stdio_to_kmsg")
    assert not service.lines("interface"), "not an AIDL or HIDL HAL"
    assert not actions, f"nothing to do outside the service: {actions}"
    for tokens, comments in (entry for entry in service.options if entry[0][0] == "capabilities"):
        note = " ".join(comments)
        assert note, "the capabilities line needs a comment that says why"
        for capability in tokens[1:]:
            assert capability in note, f"capability {capability} has no justification above it"
    assert "SYS_RESOURCE" not in {cap for tokens in service.lines("capabilities") for cap in tokens[1:]}, (
        "rlimit nofile already sets the limit"
    )
    assert service.lines("rlimit")


def unit(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_units_name_the_sockets_as_the_code_does() -> None:
    control, fds, service = unit("dmabufd.socket"), unit("dmabufd-fd.socket"), unit("dmabufd.service")
    assert control["FileDescriptorName"] == [CONTROL_ACTIVATION_NAME]
    assert fds["FileDescriptorName"] == [FD_ACTIVATION_NAME]
    # One socket per unit: FileDescriptorName= names them all.
    assert control["ListenStream"] == [str(socket_paths(Path("/run/dmabufd")).control)]
    assert fds["ListenSequentialPacket"] == [str(socket_paths(Path("/run/dmabufd")).fd)]
    assert "ListenSequentialPacket" not in control
    assert "ListenStream" not in fds
    assert service["Sockets"] == ["dmabufd.socket dmabufd-fd.socket"]
    assert control["Service"] == fds["Service"] == ["dmabufd.service"]


def test_android_socket_dir_uses_init_names() -> None:
    assert socket_paths(ANDROID_SOCKET_DIR).control == Path("/dev/socket/dmabufd")
    assert socket_paths(ANDROID_SOCKET_DIR).fd == Path("/dev/socket/dmabufd_fd")
    assert socket_paths(Path("/run/dmabufd")).fd == Path("/run/dmabufd") / FD_SOCKET_NAME
