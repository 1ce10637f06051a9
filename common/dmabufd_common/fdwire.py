"""The fd socket's wire format, shared by the daemon and its clients.

The fd socket is an AF_UNIX SOCK_SEQPACKET socket: each send is one message
and message boundaries survive, so a frame never needs a length prefix and
fds travel attached to the frame that names them. protos/fd-protocol.md is
the specification; this module is its only implementation in this tree.

Every frame starts with an 8-byte header, little-endian:

    magic "DBFD" | version u8 | type u8 | reserved u16 (0)
"""

from __future__ import annotations

import array
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum

MAGIC = b"DBFD"
VERSION = 1
HEADER = struct.Struct("<4sBBH")

# The kernel refuses more than SCM_MAX_FD (253) fds in one message.
MAX_FDS_PER_FRAME = 253
# No frame of this protocol is larger; a bigger one is garbage.
MAX_FRAME_BYTES = HEADER.size + 24 + 8 * MAX_FDS_PER_FRAME
TOKEN_BYTES = 32
TICKET_BYTES = 16
# The protobuf an ALLOCATE frame carries, and a REPLY's body, fill the rest
# of a largest frame: neither side ever needs a bigger receive buffer.
MAX_REQUEST_BYTES = MAX_FRAME_BYTES - HEADER.size - TICKET_BYTES


class FrameType(IntEnum):
    HELLO = 1  # daemon -> client, once, right after accept
    TICKET = 2  # client -> daemon, before each gRPC call
    FDS = 3  # daemon -> client, buffers created by the call with that ticket
    ERROR = 4  # daemon -> client only: a frame of the client's was rejected, or it was refused
    FILE = 5  # client -> daemon: a ticket with one file fd attached (LoadFile/LoadModel)
    ALLOCATE = 6  # client -> daemon: an AllocateRequest of one buffer, served without gRPC
    REPLY = 7  # daemon -> client: the answer to the ALLOCATE with that ticket, its fd attached


class FrameError(ValueError):
    """A frame that does not follow the protocol."""


_HELLO = struct.Struct(f"<Q{TOKEN_BYTES}siii")  # session id, token, pid, uid, gid
_FDS = struct.Struct(f"<{TICKET_BYTES}sII")  # ticket, index of first fd, total fds
_ERROR = struct.Struct("<I")  # gRPC status code, then a UTF-8 message
_REPLY = struct.Struct(f"<{TICKET_BYTES}sI")  # ticket, gRPC status code, then the body
MAX_REPLY_BODY_BYTES = MAX_FRAME_BYTES - HEADER.size - _REPLY.size


@dataclass(frozen=True)
class Hello:
    session_id: int
    token: bytes
    # The credentials the daemon read with SO_PEERCRED, echoed for diagnosis.
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Ticket:
    ticket: bytes


@dataclass(frozen=True)
class FileTicket:
    """A ticket whose frame carries exactly one fd: the file a load reads."""

    ticket: bytes


@dataclass(frozen=True)
class FdBatch:
    """Buffer ids of one frame; the frame carries one fd per id, in order."""

    ticket: bytes
    first_index: int
    total: int
    buffer_ids: tuple[int, ...]


@dataclass(frozen=True)
class ErrorFrame:
    code: int
    message: str


@dataclass(frozen=True)
class AllocateFrame:
    """A serialized AllocateRequest (one buffer), and the ticket its REPLY
    will carry. The ticket is the client's own name for the request: it
    proves nothing, since the frame arrives on the session."""

    ticket: bytes
    request: bytes


@dataclass(frozen=True)
class Reply:
    """code 0: `body` is the serialized AllocateResponse, and the frame
    carries one fd per buffer of it; else a serialized google.rpc.Status (code, message, and the details a gRPC call's
    grpc-status-details-bin trailer would carry)."""

    ticket: bytes
    code: int
    body: bytes


Frame = Hello | Ticket | FileTicket | FdBatch | ErrorFrame | AllocateFrame | Reply


def _header(kind: FrameType) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, 0)


def encode(frame: Frame) -> bytes:
    if isinstance(frame, Hello):
        body = _HELLO.pack(frame.session_id, frame.token, frame.pid, frame.uid, frame.gid)
        return _header(FrameType.HELLO) + body
    if isinstance(frame, Ticket | FileTicket):
        if len(frame.ticket) != TICKET_BYTES:
            raise FrameError(f"a ticket is {TICKET_BYTES} bytes")
        kind = FrameType.TICKET if isinstance(frame, Ticket) else FrameType.FILE
        return _header(kind) + frame.ticket
    if isinstance(frame, FdBatch):
        if len(frame.buffer_ids) > MAX_FDS_PER_FRAME:
            raise FrameError(f"at most {MAX_FDS_PER_FRAME} fds fit in one frame")
        ids = struct.pack(f"<{len(frame.buffer_ids)}Q", *frame.buffer_ids)
        return _header(FrameType.FDS) + _FDS.pack(frame.ticket, frame.first_index, frame.total) + ids
    if isinstance(frame, AllocateFrame):
        if len(frame.ticket) != TICKET_BYTES:
            raise FrameError(f"a ticket is {TICKET_BYTES} bytes")
        if len(frame.request) > MAX_REQUEST_BYTES:
            raise FrameError(f"an ALLOCATE request is at most {MAX_REQUEST_BYTES} bytes, not {len(frame.request)}")
        return _header(FrameType.ALLOCATE) + frame.ticket + frame.request
    if isinstance(frame, Reply):
        if len(frame.ticket) != TICKET_BYTES:
            raise FrameError(f"a ticket is {TICKET_BYTES} bytes")
        if len(frame.body) > MAX_REPLY_BODY_BYTES:
            raise FrameError(f"a REPLY body is at most {MAX_REPLY_BODY_BYTES} bytes, not {len(frame.body)}")
        return _header(FrameType.REPLY) + _REPLY.pack(frame.ticket, frame.code) + frame.body
    message = frame.message.encode("utf-8")[:1024]
    return _header(FrameType.ERROR) + _ERROR.pack(frame.code) + message


def decode(data: bytes) -> Frame:
    """Parse one frame; raises FrameError with a reason a person can act on."""
    if len(data) < HEADER.size:
        raise FrameError(f"frame of {len(data)} bytes is shorter than the {HEADER.size}-byte header")
    if len(data) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    magic, version, kind, _reserved = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    body = data[HEADER.size :]
    try:
        if kind == FrameType.HELLO:
            session_id, token, pid, uid, gid = _HELLO.unpack(body)
            return Hello(session_id, token, pid, uid, gid)
        if kind in (FrameType.TICKET, FrameType.FILE):
            if len(body) != TICKET_BYTES:
                raise FrameError(f"a ticket frame carries {TICKET_BYTES} bytes, not {len(body)}")
            return Ticket(body) if kind == FrameType.TICKET else FileTicket(body)
        if kind == FrameType.FDS:
            ticket, first, total = _FDS.unpack_from(body)
            rest = body[_FDS.size :]
            if len(rest) % 8:
                raise FrameError("fd frame's id list is not a whole number of u64")
            ids = struct.unpack(f"<{len(rest) // 8}Q", rest)
            return FdBatch(ticket, first, total, ids)
        if kind == FrameType.ERROR:
            (code,) = _ERROR.unpack_from(body)
            return ErrorFrame(code, body[_ERROR.size :].decode("utf-8", "replace"))
        if kind == FrameType.ALLOCATE:
            if len(body) < TICKET_BYTES:
                raise FrameError(f"an ALLOCATE frame starts with a {TICKET_BYTES}-byte ticket")
            return AllocateFrame(body[:TICKET_BYTES], body[TICKET_BYTES:])
        if kind == FrameType.REPLY:
            ticket, code = _REPLY.unpack_from(body)
            return Reply(ticket, code, body[_REPLY.size :])
    except struct.error as error:
        raise FrameError(f"truncated {FrameType(kind).name} frame: {error}") from None
    raise FrameError(f"unknown frame type {kind}")


def batches(ticket: bytes, buffer_ids: list[int]) -> list[FdBatch]:
    """Split one delivery into frames of at most MAX_FDS_PER_FRAME fds."""
    total = len(buffer_ids)
    return [
        FdBatch(ticket, start, total, tuple(buffer_ids[start : start + MAX_FDS_PER_FRAME]))
        for start in range(0, total, MAX_FDS_PER_FRAME)
    ]


# gRPC metadata keys (lower case, as HTTP/2 requires).
SESSION_METADATA_KEY = "dmabufd-session"
TICKET_METADATA_KEY = "dmabufd-ticket"

# Socket file names inside the runtime directory.
CONTROL_SOCKET_NAME = "dmabufd.sock"
FD_SOCKET_NAME = "dmabufd.fd.sock"
LOCK_FILE_NAME = "dmabufd.lock"


def receive(sock: socket.socket) -> tuple[bytes, list[int], int]:
    """Read one message and the fds attached to it: (data, fds, msg_flags).

    fds arrive close-on-exec (MSG_CMSG_CLOEXEC), so no fork+exec elsewhere in
    the process can leak them. (Python 3.11's socket.recv_fds drops its
    flags argument, hence this function.) The caller owns the fds, and must
    check msg_flags for MSG_CTRUNC (fds lost) and MSG_TRUNC (frame cut).
    """
    data, ancillary, msg_flags, _ = sock.recvmsg(
        MAX_FRAME_BYTES + 1, socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), msg_flags
