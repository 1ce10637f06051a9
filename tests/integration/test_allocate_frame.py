"""One buffer over the fd socket alone (ALLOCATE and REPLY frames,
protos/fd-protocol.md 2.8-2.9): the client's allocate() takes this path,
so the rest of the suite runs on it too. Here: that it answers what the
Allocate call answers, errors included, and that broken or concurrent
requests leave the daemon serving with no fd left behind."""

from __future__ import annotations

import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.rpc import status_pb2  # type: ignore[import-untyped]

import dmabufd_client
from dmabufd_client import errors as client_errors
from dmabufd_common import fdwire
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.reasons import Reason
from tests.conftest import DaemonFactory, RunningDaemon
from tests.integration.test_bad_input import RawSession


@pytest.fixture
def raw(daemon: RunningDaemon) -> Iterator[RawSession]:
    session = RawSession(daemon)
    yield session
    session.close()


def exchange(raw: RawSession, body: bytes) -> tuple[fdwire.Reply, list[int]]:
    """Send one ALLOCATE; return its REPLY and the fds it carries (nothing
    else may come before it)."""
    ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
    raw.sock.send(fdwire.encode(fdwire.AllocateFrame(ticket, body)))
    data, fds, _ = fdwire.receive(raw.sock)
    frame = fdwire.decode(data)
    assert isinstance(frame, fdwire.Reply), frame
    assert frame.ticket == ticket
    return frame, fds


def in_threads(work: Callable[[], None], count: int) -> list[BaseException]:
    """Run `work` in `count` threads at once; what they raised."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # returned to the test
            failures.append(error)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return failures


def test_answers_what_the_call_answers(client: dmabufd_client.Client) -> None:
    one = client.allocate(12345, name="frame")
    pair = client.allocate_batch(12345, 2, name="frame")  # a batch: the Allocate call
    try:
        for buffer in (one, *pair):
            assert buffer.size == 16384, "rounded to pages"
            assert os.fstat(buffer.fileno()).st_ino == buffer.info.inode
        for field in ("heap", "backend", "usage", "kernel_name"):
            assert getattr(one.info, field) == getattr(pair[0].info, field), field
        assert {info.id for info in client.buffers()} == {one.id, pair[0].id, pair[1].id}
    finally:
        for buffer in (one, *pair):
            buffer.close()


def test_the_reply_is_an_allocate_response_with_the_fd(raw: RawSession) -> None:
    reply, fds = exchange(raw, pb.AllocateRequest(size=4096, name="raw").SerializeToString())
    assert reply.code == 0
    response = pb.AllocateResponse.FromString(reply.body)
    (info,) = response.buffers
    (fd,) = fds
    try:
        assert os.fstat(fd).st_ino == info.inode
        assert info.size == 4096
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        (b"\xff\xff\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "does not hold an AllocateRequest"),
        (pb.AllocateRequest(size=4096, count=2).SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "for batches"),
        (pb.AllocateRequest(size=0).SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT, "at least 1 byte"),
        (pb.AllocateRequest(size=4096, heap="nope").SerializeToString(), grpc.StatusCode.NOT_FOUND, "present heaps"),
    ],
)
def test_refusals_are_replies_with_a_status(raw: RawSession, body: bytes, code: grpc.StatusCode, words: str) -> None:
    reply, fds = exchange(raw, body)
    assert not fds
    assert reply.code == code.value[0]
    status = status_pb2.Status.FromString(reply.body)
    assert status.code == reply.code
    assert words in status.message
    # Not a protocol error: the session goes on, and the next request is served.
    reply, fds = exchange(raw, pb.AllocateRequest(size=4096).SerializeToString())
    assert reply.code == 0
    for fd in fds:
        os.close(fd)


def test_a_short_allocate_frame_is_a_protocol_error(raw: RawSession) -> None:
    raw.sock.send(fdwire.HEADER.pack(fdwire.MAGIC, fdwire.VERSION, fdwire.FrameType.ALLOCATE, 0) + b"short")
    frame = raw.read_frame()
    assert isinstance(frame, fdwire.ErrorFrame)
    assert frame.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "16-byte ticket" in frame.message


def test_a_client_may_not_send_a_reply(raw: RawSession) -> None:
    raw.sock.send(fdwire.encode(fdwire.Reply(secrets.token_bytes(fdwire.TICKET_BYTES), 0, b"")))
    frame = raw.read_frame()
    assert isinstance(frame, fdwire.ErrorFrame)
    assert "may not send Reply" in frame.message


def test_quota_denial_keeps_its_details(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory('[quota.default]\nmax_bytes = "64K"\n')
    with daemon.connect() as client, client.allocate(32 << 10), pytest.raises(client_errors.QuotaExceeded) as caught:
        client.allocate(64 << 10)
    error = caught.value
    assert error.status is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == Reason.QUOTA_EXCEEDED
    assert error.metadata == {"uid": str(os.getuid())}
    ((subject, _),) = error.quota_violations
    assert subject.endswith(str(os.getuid()))


def test_threads_sharing_a_session_each_get_their_own_fds(daemon: RunningDaemon) -> None:
    """16 threads allocate on one client at once, with calls mixed in: the
    thread that reads the socket files every other thread's fds and REPLYs."""
    before = daemon.settled_fd_count()
    with daemon.connect() as client:
        inodes: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            for index in range(40):
                with client.allocate(4096 * (1 + index % 3)) as buffer:
                    assert os.fstat(buffer.fileno()).st_ino == buffer.info.inode
                    assert buffer.size == 4096 * (1 + index % 3)
                    with lock:
                        inodes.append(buffer.info.inode)
                if index % 10 == 0:
                    client.buffers()

        assert not in_threads(work, 16)
        assert len(inodes) == 16 * 40
        assert client.buffers() == []
    assert daemon.wait_for_fd_count(before) == before, "no fd left in the daemon"


def test_a_session_ended_mid_request_leaves_nothing(daemon: RunningDaemon) -> None:
    """ALLOCATE frames queued and the socket closed before any REPLY is read."""
    with daemon.connect() as warmup:  # grpc's own fds settle on first use
        warmup.allocate(4096).close()
    before = daemon.settled_fd_count()
    raw = RawSession(daemon)
    body = pb.AllocateRequest(size=1 << 20).SerializeToString()
    for _ in range(32):
        raw.sock.send(fdwire.encode(fdwire.AllocateFrame(secrets.token_bytes(fdwire.TICKET_BYTES), body)))
    raw.close()
    with daemon.connect() as other:
        other.allocate(4096).close()
    assert daemon.wait_for_fd_count(before) == before, "the ended session's buffers were released"


# Runs `python -m dmabufd ARGS...` (start_daemon's command, which follows
# these words) with every allocation taken for one that may block, as a
# device heap's does: this machine has memfds only, which are served on the
# loop, so this is how the executor path runs here (the VM suite runs it on
# real heaps).
BLOCKING_LAUNCHER = (
    sys.executable,
    "-c",
    "import sys\n"
    "from dmabufd.broker import BufferBroker\n"
    "BufferBroker.never_blocks = lambda *args, **kwargs: False\n"
    "from dmabufd.cli import main\n"
    "raise SystemExit(main(sys.argv[sys.argv.index('dmabufd') + 1 :]))\n",
)


def test_allocations_that_may_block_are_served_on_the_executor(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(wrapper=BLOCKING_LAUNCHER)
    with daemon.connect() as warmup:
        warmup.allocate(4096).close()
    before = daemon.settled_fd_count()
    with daemon.connect() as client:

        def work() -> None:
            for _ in range(30):
                with client.allocate(8192) as buffer:
                    assert os.fstat(buffer.fileno()).st_ino == buffer.info.inode

        assert not in_threads(work, 8)
        with pytest.raises(client_errors.HeapNotFound):
            client.allocate(4096, heap="no-such-heap")
        with pytest.raises(dmabufd_client.InvalidArgument, match="at least 1 byte"):
            client.allocate(0)
        assert client.buffers() == []
    assert daemon.wait_for_fd_count(before) == before, "no fd left in the daemon"
