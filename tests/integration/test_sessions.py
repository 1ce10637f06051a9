"""Session lifetime: everything a session holds goes when it ends, however
it ends; the client's own fds stay valid."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dmabufd_client
from tests.conftest import RunningDaemon

PEER = Path(__file__).with_name("peer.py")


def session_ids(daemon: RunningDaemon) -> set[int]:
    with daemon.connect() as observer:
        return {c.session_id for c in observer.stats().clients if c.session_id != observer.session_id}


def wait_until(predicate: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_frees_the_ledger_and_the_daemons_fds(daemon: RunningDaemon) -> None:
    with daemon.connect() as warmup:
        warmup.allocate(4096).close()
    baseline = daemon.settled_fd_count()
    holder = subprocess.Popen(
        [sys.executable, str(PEER), "hold", str(daemon.runtime_dir), "16", str(1 << 20)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        held = json.loads(holder.stdout.readline())
        assert len(held["ids"]) == 16
        assert daemon.fd_count() >= baseline + 16, "the daemon holds one fd per buffer"
        with daemon.connect() as observer:
            stats = observer.stats()
            (entry,) = [c for c in stats.clients if c.session_id == held["session"]]
            assert entry.buffer_count == 16
            assert entry.pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert wait_until(lambda: held["session"] not in session_ids(daemon))
    with daemon.connect() as observer:
        assert observer.stats().total_buffers == 0
    assert daemon.wait_for_fd_count(baseline) == baseline
    assert f"session {held['session']} closed" in daemon.log()


def test_process_exit_ends_the_session_even_if_a_child_keeps_the_socket(daemon: RunningDaemon) -> None:
    """The pidfd, not just the socket, bounds a session: a forked child
    that inherited the fd socket cannot keep the parent's buffers booked."""
    script = (
        "import os, sys, time, dmabufd_client\n"
        f"c = dmabufd_client.connect({str(daemon.runtime_dir)!r})\n"
        "c.allocate_batch(4096, 4)\n"
        "print(c.session_id, flush=True)\n"
        "if os.fork() == 0:\n"
        "    time.sleep(30)\n"
        "    os._exit(0)\n"
        "os._exit(0)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    session = int(parent.stdout.readline())
    assert parent.wait(timeout=30) == 0
    parent.stdout.close()  # the child keeps its copy of the pipe, and of the fd socket
    assert wait_until(lambda: session not in session_ids(daemon))
    assert f"session {session} closed: process" in daemon.log()


def test_closing_a_session_keeps_client_fds_valid(daemon: RunningDaemon) -> None:
    client = daemon.connect()
    buffer = client.allocate(4096)
    with buffer.map() as mapping:
        mapping.memoryview[:4] = b"live"
    client.close()
    assert wait_until(lambda: client.session_id not in session_ids(daemon))
    with mmap.mmap(buffer.fileno(), 4096) as region:
        assert region[:4] == b"live"
    buffer.close()  # the session is gone: only the fd is closed


def test_sessions_report_peer_credentials(daemon: RunningDaemon) -> None:
    with daemon.connect() as client:
        (mine,) = [c for c in client.stats().clients if c.session_id == client.session_id]
        assert (mine.pid, mine.uid, mine.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert mine.command


def test_many_sessions_at_once(daemon: RunningDaemon) -> None:
    clients = [daemon.connect() for _ in range(50)]
    try:
        buffers = [client.allocate(4096) for client in clients]
        assert len({b.id for b in buffers}) == 50
        with dmabufd_client.connect(daemon.runtime_dir) as observer:
            assert observer.stats().total_buffers == 50
    finally:
        for client in clients:
            client.close()
