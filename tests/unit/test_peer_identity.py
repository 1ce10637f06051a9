"""Who connected to the fd socket (transport/fdserver.py): the groups and
the pidfd a session gets name the process that called connect(), even when
that process changed its groups since, or exited and left its pid to
another process before the daemon looked.

Setting groups and taking a pid back (ns_last_pid) need root; run as
anyone else these tests fail, on purpose, rather than skip. The one skip is
the pid-reuse test on a kernel without SO_PEERPIDFD (before 6.5), where
the daemon's fallback keeps that race and the test could only fail."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmabufd.sessions.session import Peer
from dmabufd.transport import fdserver
from dmabufd_common import uapi

# Groups no account on a test machine has: the client takes them on itself.
GROUP_AT_CONNECT = 40001
GROUP_AFTER = 40002

# Connects to argv[1] with the groups argv[2] (a comma list), then takes
# the groups argv[3], says so, and waits for its stdin to close.
_CLIENT = textwrap.dedent(
    """
    import os, socket, sys
    os.setgroups([int(g) for g in sys.argv[2].split(",")])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(sys.argv[1])
    os.setgroups([int(g) for g in sys.argv[3].split(",")])
    print("connected", flush=True)
    sys.stdin.read()
    """
)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root: its client sets its own groups")


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "fd.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    sock.listen(8)
    yield sock, path
    sock.close()


def connected_client(path: str, groups: list[int], groups_after: list[int]) -> subprocess.Popen[str]:
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, path, ",".join(map(str, groups)), ",".join(map(str, groups_after))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "connected", "the client did not connect"
    return client


def end(client: subprocess.Popen[str]) -> None:
    assert client.stdin is not None
    assert client.stdout is not None
    client.stdin.close()
    client.wait(timeout=10)
    client.stdout.close()


def kernel_has_peerpidfd() -> bool:
    left, right = socket.socketpair()
    with left, right:
        try:
            os.close(left.getsockopt(socket.SOL_SOCKET, uapi.SO_PEERPIDFD))
        except OSError as error:
            if error.errno == errno.ENOPROTOOPT:
                return False
            raise
    return True


def pid_of_pidfd(pidfd: int) -> int:
    """The Pid: line of a pidfd's fdinfo: -1 once its process was reaped."""
    for line in Path(f"/proc/self/fdinfo/{pidfd}").read_text().splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise AssertionError("a pidfd's fdinfo has a Pid: line")


def test_groups_are_those_the_client_had_when_it_connected(listener: tuple[socket.socket, str]) -> None:
    """A client that connects, then takes other groups, is judged by the
    groups it connected with, as SO_PEERCRED's uid and gid are."""
    require_root()
    server, path = listener
    client = connected_client(path, [GROUP_AT_CONNECT], [GROUP_AFTER])
    conn, _ = server.accept()
    try:
        peer = fdserver._peer_of(conn)
        assert peer.pid == client.pid
        assert peer.groups == frozenset({GROUP_AT_CONNECT})
    finally:
        conn.close()
        end(client)


def test_more_groups_than_socket_getsockopt_can_ask_for(listener: tuple[socket.socket, str]) -> None:
    """socket.getsockopt() reads at most 1,024 bytes: 256 groups."""
    require_root()
    server, path = listener
    many = list(range(50000, 51000))
    client = connected_client(path, many, [GROUP_AFTER])
    conn, _ = server.accept()
    try:
        assert fdserver._peer_of(conn).groups == frozenset(many)
    finally:
        conn.close()
        end(client)


def take_pid(pid: int) -> subprocess.Popen[bytes]:
    """A new process with `pid`, which must be free: the kernel gives the
    next fork ns_last_pid + 1 (another fork on the machine may take it
    first, hence the tries)."""
    for _ in range(50):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        process = subprocess.Popen(["sleep", "60"])
        if process.pid == pid:
            return process
        process.kill()
        process.wait()
    raise AssertionError(f"no new process got pid {pid} back in 50 tries")


def test_pidfd_never_names_a_process_that_took_the_clients_pid(listener: tuple[socket.socket, str]) -> None:
    """The client connects and exits before the daemon accepts, and another
    process gets its pid. pidfd_open(pid) would watch that process as the
    session's; the pidfd from the socket names the client, now gone."""
    require_root()
    if not kernel_has_peerpidfd():
        pytest.skip("the kernel has no SO_PEERPIDFD (Linux 6.5): its pidfd_open fallback keeps this race")
    server, path = listener
    client = connected_client(path, [GROUP_AT_CONNECT], [GROUP_AT_CONNECT])
    end(client)
    impostor = take_pid(client.pid)
    conn, _ = server.accept()
    try:
        with contextlib.suppress(ProcessLookupError):  # 6.5-6.15: no pidfd of a reaped process
            pidfd = fdserver._peer_pidfd(conn, client.pid)
            try:
                assert pid_of_pidfd(pidfd) != impostor.pid
            finally:
                os.close(pidfd)
    finally:
        conn.close()
        impostor.kill()
        impostor.wait()


def test_pidfd_of_a_live_client_on_either_path(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SO_PEERPIDFD, and pidfd_open(pid) where the kernel does not know the
    option (an unknown option number stands in for a kernel before 6.5)."""
    require_root()
    server, path = listener
    for option in (uapi.SO_PEERPIDFD, 0x7FFF):
        monkeypatch.setattr(uapi, "SO_PEERPIDFD", option)
        client = connected_client(path, [GROUP_AT_CONNECT], [GROUP_AT_CONNECT])
        conn, _ = server.accept()
        try:
            pidfd = fdserver._peer_pidfd(conn, client.pid)
            try:
                assert pid_of_pidfd(pidfd) == client.pid
            finally:
                os.close(pidfd)
        finally:
            conn.close()
            end(client)


# Listens on argv[1] inside a pid namespace of its own, says so, and prints
# what the daemon's accept makes of the one peer that connects.
_LISTENER_IN_ITS_OWN_PID_NAMESPACE = textwrap.dedent(
    """
    import json, socket, sys
    sys.path[:0] = sys.argv[2:]
    from dmabufd.transport import fdserver
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(sys.argv[1])
    server.listen(1)
    print("listening", flush=True)
    conn, _ = server.accept()
    peer = fdserver._peer_of(conn)
    print(json.dumps({"pid": peer.pid, "refusal": fdserver._out_of_sight(peer)}), flush=True)
    """
)


def test_a_client_outside_the_daemons_pid_namespace_is_refused(tmp_path: Path) -> None:
    """A daemon in a pid namespace (a container) sees a client outside it
    as pid 0: it could neither watch the client nor see what it holds."""
    require_root()
    path = str(tmp_path / "fd.sock")
    paths = [str(Path(fdserver.__file__).parents[2]), str(Path(uapi.__file__).parents[1])]
    unshare = ["unshare", "--pid", "--fork", "--kill-child"]
    daemon_side = subprocess.Popen(
        [*unshare, sys.executable, "-c", _LISTENER_IN_ITS_OWN_PID_NAMESPACE, path, *paths],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert daemon_side.stdout is not None
    try:
        assert daemon_side.stdout.readline().strip() == "listening"
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(path)
            seen = json.loads(daemon_side.stdout.readline())
        assert seen["pid"] == 0
        assert "outside dmabufd's pid namespace" in seen["refusal"]
    finally:
        daemon_side.kill()
        daemon_side.wait()
        daemon_side.stdout.close()
    # Seen from its own namespace, the same peer is in sight.
    assert fdserver._out_of_sight(Peer(os.getpid(), 0, 0, frozenset(), "test")) is None
