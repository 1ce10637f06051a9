"""Who connected to the fd socket (transport/fdserver.py): the groups and
the pidfd a session gets name the process that called connect(), even when
that process changed its groups since, or exited and left its pid to
another process before the daemon looked.

Setting groups and taking a pid back (ns_last_pid) need root; run as
anyone else these tests fail, on purpose, rather than skip."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    client.stdin.close()
    client.wait(timeout=10)


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
    server, path = listener
    client = connected_client(path, [GROUP_AT_CONNECT], [GROUP_AT_CONNECT])
    end(client)
    impostor = take_pid(client.pid)
    conn, _ = server.accept()
    try:
        with contextlib.suppress(ProcessLookupError):  # before 6.16: no pidfd of a reaped process
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
