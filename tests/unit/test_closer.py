"""The closer: how the daemon lets go of files a client gave it
(transport/closer.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest

from dmabufd.transport.closer import Closer, drain

UID = 12345


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_fds_are_closed_by_the_uids_worker() -> None:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    closing = Closer()
    closing.close(UID, fds)
    assert closing.settle(5.0)
    assert closing.pending(UID) == 0
    assert not any(is_open(fd) for fd in fds)


def test_each_worker_is_placed_before_it_closes_and_closes_even_if_that_fails() -> None:
    placed: list[tuple[int, bool]] = []
    fds = [os.open("/dev/null", os.O_RDONLY)]

    def place() -> None:
        placed.append((threading.get_ident(), is_open(fds[0])))
        raise OSError(22, "no CPU left")

    closing = Closer(place)
    closing.close(UID, fds)
    assert closing.settle(5.0)
    assert placed
    assert placed[0][0] != threading.get_ident(), "on the worker, not the caller"
    assert placed[0][1], "before the close"
    assert not is_open(fds[0])


def test_without_a_thread_the_fds_wait_and_are_never_closed_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing in place could be on the event loop: when no thread can be
    started, the fds stay queued, and the next pending() (which the fd
    server asks at every connection) starts the worker."""
    closing = Closer()
    first = os.open("/dev/null", os.O_RDONLY)

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", no_thread)
        closing.close(UID, [first])
        assert is_open(first)
        assert closing.pending(UID) == 1
    closing.pending(UID)
    assert closing.settle(5.0)
    assert not is_open(first)


def test_a_queue_of_messages_without_files_reads_as_empty() -> None:
    daemon_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for _ in range(5):
        client_end.send(b"")  # zero-length messages look like the end of the queue without SO_PASSCRED
    client_end.send(b"frame")
    client_end.close()
    assert drain(daemon_end, 64) is True
    daemon_end.close()


def test_a_file_queued_behind_other_messages_is_found_and_left_queued() -> None:
    daemon_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    for _ in range(5):
        client_end.send(b"")
    client_end.sendmsg([b""], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, read_end.to_bytes(4, "little"))])
    client_end.close()
    os.close(read_end)
    assert drain(daemon_end, 64) is False
    _, ancillary, _, _ = daemon_end.recvmsg(1, socket.CMSG_SPACE(64))  # still there, unharmed
    (passed,) = [payload for _, kind, payload in ancillary if kind == socket.SCM_RIGHTS]
    received = int.from_bytes(passed[:4], "little")
    os.write(write_end, b"x")
    assert os.read(received, 1) == b"x"
    for fd in (received, write_end):
        os.close(fd)
    daemon_end.close()


def test_a_connection_with_nothing_queued_is_closed_at_once() -> None:
    daemon_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    closing = Closer()
    closing.close_socket(UID, daemon_end)
    assert closing.pending(UID) == 0
    assert daemon_end.fileno() == -1
    assert client_end.recv(1) == b""  # the client sees the end
    client_end.close()


def test_a_long_queue_of_empty_messages_is_read_over_several_turns() -> None:
    """A sender can queue thousands of empty messages: each call reads at
    most `most` of them and says so (None), until the end."""
    daemon_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client_end.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while sent < 600:
            client_end.send(b"")
            sent += 1
    client_end.close()
    verdicts: list[bool | None] = []
    while (verdict := drain(daemon_end, 256)) is None:
        verdicts.append(verdict)
    assert verdict is True
    assert len(verdicts) == (sent - 1) // 256
    daemon_end.close()
