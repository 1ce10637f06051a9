"""Bounded fuzzing of the fd socket: hypothesis generates the frames a
hostile client can send (random bytes, well-formed headers with random
types, versions and lengths, TICKET and FILE frames carrying 0 to 5 fds
of every kind) on one session at a time, in a fixed budget."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dmabufd_common import fdwire
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc
from tests.conftest import DaemonFactory, RunningDaemon
from tests.security.conftest import VictimOf, assert_recovered, assert_served, footprint

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
MAX_PROTOCOL_ERRORS = 64
FD_KINDS = ("pipe", "devnull", "memfd", "socket", "file", "directory")
EXAMPLES = 300
BUDGET_S = 30.0


class Verdict(Enum):
    REFUSE = "refuse"  # the protocol says: ERROR INVALID_ARGUMENT (or the session ends)
    MAY_TAKE = "may take"  # a well-formed TICKET/FILE frame: taken, or refused
    MAY_END = "may end"  # an empty message: indistinguishable from a hang-up


@dataclass(frozen=True)
class Case:
    data: bytes
    fd_kinds: tuple[str, ...]

    def verdict(self) -> Verdict:
        if not self.data and not self.fd_kinds:
            return Verdict.MAY_END
        try:
            frame = fdwire.decode(self.data)
        except fdwire.FrameError:
            return Verdict.REFUSE
        if isinstance(frame, fdwire.FileTicket) and len(self.fd_kinds) == 1:
            return Verdict.MAY_TAKE
        if isinstance(frame, fdwire.Ticket) and not self.fd_kinds:
            return Verdict.MAY_TAKE
        return Verdict.REFUSE  # fds on the wrong frame, or a daemon-only frame type


def header(kind: int, version: int = fdwire.VERSION, magic: bytes = fdwire.MAGIC, reserved: int = 0) -> bytes:
    return struct.pack("<4sBBH", magic, version, kind, reserved)


fds = st.lists(st.sampled_from(FD_KINDS), max_size=5).map(tuple)
random_bytes = st.builds(Case, st.binary(max_size=2200), fds)
random_headers = st.builds(
    lambda kind, version, reserved, body, kinds: Case(header(kind, version, reserved=reserved) + body, kinds),
    st.integers(0, 255),
    st.sampled_from([fdwire.VERSION, fdwire.VERSION, 0, 2, 255]),
    st.sampled_from([0, 0, 0, 1, 0xFFFF]),
    st.binary(max_size=2100),
    fds,
)
tickets = st.builds(
    lambda kind, body, kinds: Case(header(kind) + body, kinds),
    st.sampled_from([fdwire.FrameType.TICKET, fdwire.FrameType.FILE]),
    st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=40)),
    fds,
)
frames = st.one_of(random_bytes, random_headers, tickets)


def open_fds(kinds: tuple[str, ...], directory: str) -> list[int]:
    out: list[int] = []
    for kind in kinds:
        if kind == "pipe":
            read_end, write_end = os.pipe()
            os.close(write_end)
            out.append(read_end)
        elif kind == "devnull":
            out.append(os.open("/dev/null", os.O_RDWR))
        elif kind == "memfd":
            memfd = os.memfd_create("fuzz")
            os.write(memfd, b"fuzz" * 1024)
            out.append(memfd)
        elif kind == "socket":
            left, right = socket.socketpair()
            out.append(left.detach())
            right.close()
        elif kind == "file":
            out.append(os.open(os.path.join(directory, "data.bin"), os.O_RDONLY))
        else:
            out.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
    return out


class FuzzClient:
    """One session at a time, reconnecting when the daemon ends one; after
    each frame, a call on the session proves the daemon has read it (the
    daemon handles a session's frames in order), then whatever it replied
    is read."""

    def __init__(self, daemon: RunningDaemon, directory: str) -> None:
        self._path = str(daemon.runtime_dir / fdwire.FD_SOCKET_NAME)
        self._directory = directory
        self._channel = grpc.insecure_channel(f"unix:{daemon.runtime_dir / fdwire.CONTROL_SOCKET_NAME}")
        self._stub = pb_grpc.BufferServiceStub(self._channel)
        self.sessions = 0
        self.errors_seen = 0
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        self.sock.connect(self._path)
        hello = self._read()
        assert isinstance(hello, fdwire.Hello), hello
        self._token = hello.token.hex()
        self.errors = 0  # ERROR frames this session
        self.taken = 0  # frames of this session that may hold a ticket slot
        self.sessions += 1

    def _read(self) -> fdwire.Frame | None:
        data, received, _ = fdwire.receive(self.sock)
        for fd in received:
            os.close(fd)
        assert not received, "the daemon sent fds to a client that asked for none"
        return fdwire.decode(data) if data else None

    def reconnect(self) -> None:
        self.sock.close()
        self._connect()

    def send(self, case: Case) -> None:
        attached = open_fds(case.fd_kinds, self._directory)
        try:
            socket.send_fds(self.sock, [case.data], attached) if attached else self.sock.send(case.data)
        finally:
            for fd in attached:
                os.close(fd)

    def replies(self) -> list[fdwire.Frame] | None:
        """What the daemon sent about the frames so far, or None once it has
        ended the session (its last frames are then in `self.last_words`)."""
        ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
        metadata = ((fdwire.SESSION_METADATA_KEY, self._token), (fdwire.TICKET_METADATA_KEY, ticket.hex()))
        try:
            self.sock.send(fdwire.encode(fdwire.Ticket(ticket)))
            self._stub.ListBuffers(pb.ListBuffersRequest(), metadata=metadata, timeout=5)
        except (OSError, grpc.RpcError):
            self.last_words = self._until_hang_up()
            return None
        pending: list[fdwire.Frame] = []
        self.sock.setblocking(False)
        try:
            while True:
                frame = self._read()
                if frame is None:
                    self.last_words = pending
                    return None
                pending.append(frame)
        except BlockingIOError:
            return pending
        finally:
            self.sock.settimeout(10)

    def _until_hang_up(self) -> list[fdwire.Frame]:
        frames: list[fdwire.Frame] = []
        try:
            while (frame := self._read()) is not None:
                frames.append(frame)
        except OSError:
            pass  # ECONNRESET: hung up
        return frames

    def close(self) -> None:
        self.sock.close()
        self._channel.close()


def assert_protocol_errors(frames: list[fdwire.Frame]) -> None:
    for frame in frames:
        assert isinstance(frame, fdwire.ErrorFrame), f"the daemon answered a client frame with {frame!r}"
        assert frame.code == INVALID_ARGUMENT, f"protocol error with status {frame.code}: {frame.message}"


def test_fuzzed_frames_on_the_fd_socket(daemon_factory: DaemonFactory, victim_of: VictimOf, tmp_path: Path) -> None:
    """Attack: ~300 generated frames (random bytes; valid headers with random
    types, versions, reserved fields and lengths; TICKET and FILE frames
    with 0..5 attached pipes, /dev/null, memfds, sockets, files or
    directories) from one session at a time.
    Defence: the daemon stays alive; it answers every malformed frame with
    one ERROR frame INVALID_ARGUMENT (and nothing but ERROR frames), and
    ends a session only after 64 of them (or on an empty message, which
    reads as a hang-up); another client is served fast meanwhile; once the
    fuzzing client is gone, every fd it sent is closed (fd count back to
    the baseline)."""
    daemon = daemon_factory(public=True)
    (tmp_path / "data.bin").write_bytes(b"fuzz" * 4096)
    directory = str(tmp_path)
    before = footprint(daemon)
    victim = victim_of(daemon)
    victim.start()
    client = FuzzClient(daemon, directory)
    began = time.monotonic()
    sent = [0]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the budget is fixed
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(frames)
    def one_frame(case: Case) -> None:
        assert time.monotonic() - began < BUDGET_S, "fuzzing ran over its budget"
        assert daemon.process.poll() is None, "dmabufd died"
        verdict = case.verdict()
        client.send(case)
        sent[0] += 1
        replies = client.replies()
        if replies is None:
            assert_protocol_errors(client.last_words)
            errors = client.errors + len(client.last_words)
            assert verdict is Verdict.MAY_END or errors >= MAX_PROTOCOL_ERRORS - 1, (
                f"the daemon ended a session after {errors} protocol errors, on {verdict.value} frame {case!r}"
            )
            client.reconnect()
            return
        assert_protocol_errors(replies)
        assert len(replies) <= 1, f"{len(replies)} replies to one frame"
        if verdict is Verdict.REFUSE:
            assert len(replies) == 1, f"no ERROR frame for a malformed frame {case!r}"
        client.errors += len(replies)
        client.errors_seen += len(replies)
        client.taken += not replies
        if client.taken >= 200:  # the daemon allows 256 outstanding tickets per session
            client.reconnect()

    try:
        one_frame()
    finally:
        client.close()
    served = victim.stop()
    print(
        f"{sent[0]} fuzzed frames in {time.monotonic() - began:.1f} s over {client.sessions} sessions, "
        f"{client.errors_seen} ERROR frames"
    )
    assert daemon.process.poll() is None, "dmabufd died"
    assert_served(served)
    assert_recovered(daemon, before)
