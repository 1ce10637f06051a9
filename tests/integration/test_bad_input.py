"""Bad input: each gets a clear status, and the daemon serves on with no fd
leaked. Raw gRPC stubs and raw fd sockets stand in for broken clients."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import dmabufd_client
from dmabufd_common import fdwire
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc
from tests.conftest import RunningDaemon


class RawSession:
    """An fd socket and a gRPC stub driven by hand."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(10)
        self.sock.connect(str(daemon.runtime_dir / fdwire.FD_SOCKET_NAME))
        hello = self.read_frame()
        assert isinstance(hello, fdwire.Hello)
        self.hello = hello
        self.channel = grpc.insecure_channel(f"unix:{daemon.runtime_dir / fdwire.CONTROL_SOCKET_NAME}")
        self.stub = pb_grpc.BufferServiceStub(self.channel)

    def read_frame(self) -> fdwire.Frame:
        data, fds, _ = fdwire.receive(self.sock)
        for fd in fds:
            os.close(fd)
        return fdwire.decode(data)

    def ticket(self) -> bytes:
        ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
        self.sock.send(fdwire.encode(fdwire.Ticket(ticket)))
        return ticket

    def metadata(self, token: bytes | None = None, ticket: bytes | None = None) -> tuple[tuple[str, str], ...]:
        token = self.hello.token if token is None else token
        ticket = self.ticket() if ticket is None else ticket
        return ((fdwire.SESSION_METADATA_KEY, token.hex()), (fdwire.TICKET_METADATA_KEY, ticket.hex()))

    def close(self) -> None:
        self.sock.close()
        self.channel.close()


@pytest.fixture
def raw(daemon: RunningDaemon) -> Iterator[RawSession]:
    session = RawSession(daemon)
    yield session
    session.close()


@pytest.fixture
def baseline(daemon: RunningDaemon) -> Iterator[int]:
    """The daemon's fd count before the test; checked after it (once every
    session the test opened has ended) and the daemon must still serve."""
    with daemon.connect() as warmup:  # grpc's own fds settle on first use
        warmup.allocate(4096).close()
    before = daemon.settled_fd_count()
    yield before
    with daemon.connect() as after, after.allocate(4096) as buffer:
        assert buffer.size == 4096, "the daemon keeps serving"
    assert daemon.wait_for_fd_count(before) == before, "no fd leaked"


def allocate_error(client: dmabufd_client.Client, size: int | str, **kwargs: Any) -> dmabufd_client.DmabufdError:
    with pytest.raises(dmabufd_client.DmabufdError) as caught:
        client.allocate(size, **kwargs)
    return caught.value


@pytest.mark.usefixtures("baseline")
class TestRequests:
    def test_size_zero(self, client: dmabufd_client.Client) -> None:
        error = allocate_error(client, 0)
        assert error.status is grpc.StatusCode.INVALID_ARGUMENT
        assert "at least 1 byte" in error.message

    def test_negative_size_is_refused_before_sending(self, client: dmabufd_client.Client) -> None:
        with pytest.raises(dmabufd_client.InvalidArgument, match="negative"):
            client.allocate(-4096)

    def test_negative_size_from_a_c_client(self, raw: RawSession) -> None:
        """A C client's (uint64_t)-1 reaches the daemon as 2^64 - 1."""
        with pytest.raises(grpc.RpcError) as caught:
            raw.stub.Allocate(pb.AllocateRequest(size=2**64 - 1), metadata=raw.metadata())
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    def test_absurd_size(self, client: dmabufd_client.Client) -> None:
        error = allocate_error(client, 2**63)
        assert error.status is grpc.StatusCode.INVALID_ARGUMENT
        assert "largest buffer" in error.message

    def test_unknown_heap(self, client: dmabufd_client.Client) -> None:
        error = allocate_error(client, 4096, heap="no-such-heap")
        assert error.status is grpc.StatusCode.NOT_FOUND
        assert "present heaps: memfd" in error.message

    def test_alias_with_nothing_behind_it(self, client: dmabufd_client.Client) -> None:
        error = allocate_error(client, 4096, heap="cma")
        assert error.status is grpc.StatusCode.NOT_FOUND
        assert "alias of" in error.message

    def test_unknown_usage(self, client: dmabufd_client.Client) -> None:
        error = allocate_error(client, 4096, usage="teleport")
        assert error.status is grpc.StatusCode.INVALID_ARGUMENT
        assert "known usages" in error.message

    def test_name_too_long(self, client: dmabufd_client.Client) -> None:
        error = allocate_error(client, 4096, name="x" * 24)
        assert error.status is grpc.StatusCode.INVALID_ARGUMENT
        assert "longer than 23 bytes" in error.message

    def test_name_with_nul(self, client: dmabufd_client.Client) -> None:
        error = allocate_error(client, 4096, name="cam\x00era")
        assert error.status is grpc.StatusCode.INVALID_ARGUMENT
        assert "'\\x00'" in error.message

    def test_count_over_batch_limit(self, client: dmabufd_client.Client) -> None:
        with pytest.raises(dmabufd_client.InvalidArgument, match="count must be between 1 and 1024"):
            client.allocate_batch(4096, 1025)

    def test_release_unknown_id_releases_nothing(self, client: dmabufd_client.Client) -> None:
        with client.allocate(4096) as buffer:
            with pytest.raises(dmabufd_client.NotFound, match="99999"):
                client.release([buffer.id, 99999])
            assert [info.id for info in client.buffers()] == [buffer.id], "all or nothing"

    def test_describe_another_sessions_buffer(self, daemon: RunningDaemon, client: dmabufd_client.Client) -> None:
        with daemon.connect() as other, other.allocate(4096) as theirs:
            with pytest.raises(dmabufd_client.NotFound):
                client.describe(theirs.id)
            with pytest.raises(dmabufd_client.NotFound):
                client.release([theirs.id])


@pytest.mark.usefixtures("baseline")
class TestSessionCredentials:
    def test_missing_token(self, raw: RawSession) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            raw.stub.ListBuffers(pb.ListBuffersRequest())
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "connect to the fd socket first" in str(caught.value.details())

    def test_forged_token(self, raw: RawSession) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            raw.stub.ListBuffers(pb.ListBuffersRequest(), metadata=raw.metadata(token=secrets.token_bytes(32)))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED

    def test_malformed_token(self, raw: RawSession) -> None:
        metadata = ((fdwire.SESSION_METADATA_KEY, "not hex"), (fdwire.TICKET_METADATA_KEY, raw.ticket().hex()))
        with pytest.raises(grpc.RpcError) as caught:
            raw.stub.ListBuffers(pb.ListBuffersRequest(), metadata=metadata)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED

    def test_token_of_another_session(self, daemon: RunningDaemon, raw: RawSession) -> None:
        """A leaked token is useless without its session's fd socket: the
        call's ticket arrived on our socket, not the token's."""
        victim = RawSession(daemon)
        try:
            with pytest.raises(grpc.RpcError) as caught:
                raw.stub.Allocate(pb.AllocateRequest(size=4096), metadata=raw.metadata(token=victim.hello.token))
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "does not belong" in str(caught.value.details())
            victim.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                victim.sock.recv(64)  # no fds were sent to the victim either
        finally:
            victim.close()

    def test_ticket_never_sent(self, raw: RawSession) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            raw.stub.ListBuffers(
                pb.ListBuffersRequest(), metadata=raw.metadata(ticket=secrets.token_bytes(fdwire.TICKET_BYTES))
            )
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "never arrived" in str(caught.value.details())

    def test_ticket_is_single_use(self, raw: RawSession) -> None:
        ticket = raw.ticket()
        raw.stub.ListBuffers(pb.ListBuffersRequest(), metadata=raw.metadata(ticket=ticket))
        with pytest.raises(grpc.RpcError) as caught:
            raw.stub.ListBuffers(pb.ListBuffersRequest(), metadata=raw.metadata(ticket=ticket))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.usefixtures("baseline")
class TestFdSocketAbuse:
    def test_garbage_frame(self, raw: RawSession) -> None:
        raw.sock.send(b"\x00garbage, not a frame")
        frame = raw.read_frame()
        assert isinstance(frame, fdwire.ErrorFrame)
        assert frame.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "bad magic" in frame.message
        # The session survives one bad frame.
        response = raw.stub.ListBuffers(pb.ListBuffersRequest(), metadata=raw.metadata())
        assert list(response.buffers) == []

    def test_unexpected_fds_are_closed(self, daemon: RunningDaemon, raw: RawSession, tmp_path: object) -> None:
        read_end, write_end = os.pipe()
        try:
            frame = fdwire.encode(fdwire.Ticket(secrets.token_bytes(fdwire.TICKET_BYTES)))
            socket.send_fds(raw.sock, [frame], [read_end, write_end, read_end])
        finally:
            os.close(read_end)
            os.close(write_end)
        reply = raw.read_frame()
        assert isinstance(reply, fdwire.ErrorFrame)
        assert "unexpected fds (3 closed)" in reply.message

    def test_frame_too_large(self, raw: RawSession) -> None:
        raw.sock.send(b"DBFD" + bytes(8192))
        reply = raw.read_frame()
        assert isinstance(reply, fdwire.ErrorFrame)
        assert "longer than" in reply.message

    def test_client_sending_server_frames(self, raw: RawSession) -> None:
        raw.sock.send(fdwire.encode(fdwire.ErrorFrame(2, "hi")))
        reply = raw.read_frame()
        assert isinstance(reply, fdwire.ErrorFrame)
        assert "may not send ErrorFrame" in reply.message

    def test_endless_garbage_ends_the_session(self, raw: RawSession) -> None:
        for _ in range(64):
            raw.sock.send(b"junk")
        frames = 0
        while raw.sock.recv(4096):
            frames += 1
        assert frames == 63, "an error frame for each, then the daemon hangs up"

    def test_disconnect_mid_call(self, daemon: RunningDaemon, raw: RawSession) -> None:
        """The client hangs up while its batch is being allocated: the call
        fails or the buffers are freed with the session; nothing leaks."""
        ticket = raw.ticket()
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                raw.stub.Allocate(
                    pb.AllocateRequest(size=1 << 20, count=512), metadata=raw.metadata(ticket=ticket), timeout=20
                )
                outcome["status"] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                outcome["status"] = error.code()

        caller = threading.Thread(target=call)
        caller.start()
        raw.sock.close()
        caller.join(timeout=30)
        assert outcome["status"] in (
            grpc.StatusCode.OK,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.UNAVAILABLE,
        )
        with daemon.connect() as observer:
            assert observer.stats().total_buffers == 0

    def test_cancelled_call(self, daemon: RunningDaemon, client: dmabufd_client.Client) -> None:
        """A deadline that expires mid-call: the client gets DEADLINE_EXCEEDED
        and whatever the daemon allocated stays accounted to the session
        (and is freed with it)."""
        stub = pb_grpc.BufferServiceStub(client._channel)
        ticket = client._fds.new_ticket()
        metadata = client._metadata(ticket)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Allocate(pb.AllocateRequest(size=1 << 20, count=1024), metadata=metadata, timeout=0.001)
        assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        client._fds.discard(ticket)


def test_a_file_whose_reads_fail_is_named_not_an_internal_error(client: dmabufd_client.Client) -> None:
    """Reading /sys/class/net/lo/speed fails with EINVAL (a loopback device
    has no speed), as a bad sector fails with EIO: the client is told the
    read failed and why, for LoadFile and LoadModel alike."""
    path = Path("/sys/class/net/lo/speed")
    with (
        open(path, "rb") as fh,
        pytest.raises(dmabufd_client.InvalidArgument, match=r"reading the file failed: .*\(EINVAL\)"),
    ):
        client.load_file(fh)
    with open(path, "rb") as fh, pytest.raises(dmabufd_client.InvalidArgument, match=r"\(EINVAL\)"):
        client.load_model(fh)
