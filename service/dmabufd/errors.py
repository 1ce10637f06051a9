"""Errors the daemon reports to clients, each with its gRPC status and
its reason.

Raise these anywhere below the API layer; api/base.py turns them into the
call's status: the code, the message, and a google.rpc.Status whose
ErrorInfo names the `reason` (dmabufd_common/reasons.py: the names the
clients map to their exception types). Messages are for people: say what
was wrong and what to do instead. Reasons are for programs: one per class,
so a new kind of failure gets a new class and, if clients must tell it
apart, a new reason.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

from dmabufd_common.reasons import Reason


class DmabufdError(Exception):
    """Base of every error a client may see. A class without a reason of
    its own (the base, or one defined outside this module that sets none)
    is reported by its status alone, with no ErrorInfo."""

    status: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    reason: ClassVar[Reason | None] = None

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        """`metadata`: context for programs, sent as the ErrorInfo's
        metadata (short strings; never unbounded client input)."""
        super().__init__(message)
        self.metadata = dict(metadata or {})


class InvalidRequest(DmabufdError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_REQUEST


class HeapNotFound(DmabufdError):
    status = grpc.StatusCode.NOT_FOUND
    reason = Reason.HEAP_NOT_FOUND


class BufferNotFound(DmabufdError):
    status = grpc.StatusCode.NOT_FOUND
    reason = Reason.BUFFER_NOT_FOUND


class AccessDenied(DmabufdError):
    status = grpc.StatusCode.PERMISSION_DENIED
    reason = Reason.ACCESS_DENIED


class QuotaExceeded(DmabufdError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.QUOTA_EXCEEDED


class Overloaded(DmabufdError):
    """A per-uid limit on the daemon's own resources (calls, streams,
    sessions, outbox): the client must slow down, not allocate less."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.OVERLOADED


class BufferBusy(DmabufdError):
    """The buffer is part of something larger (a pool) that must be released whole."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.BUFFER_BUSY


class OutOfMemory(DmabufdError):
    """The kernel could not provide the memory."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.HEAP_OUT_OF_MEMORY


class SessionInvalid(DmabufdError):
    """Missing, unknown or closed session, or a ticket that does not prove
    the caller holds the session's fd socket."""

    status = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.SESSION_INVALID


class HeapUnavailable(DmabufdError):
    """A heap that exists but cannot serve right now (removed, failing)."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = Reason.HEAP_UNAVAILABLE


class DeliveryFailed(DmabufdError):
    """The fds could not be sent on the session's fd socket."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = Reason.DELIVERY_FAILED


class ConfigError(Exception):
    """The configuration file is wrong; raised at start-up, never to clients."""


class OutOfRange(DmabufdError):
    """An offset or length outside the file."""

    status = grpc.StatusCode.OUT_OF_RANGE
    reason = Reason.OUT_OF_RANGE


class FileNotFound(DmabufdError):
    status = grpc.StatusCode.NOT_FOUND
    reason = Reason.FILE_NOT_FOUND


class FileChanged(DmabufdError):
    """The file changed under a load (truncated, replaced)."""

    status = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.FILE_CHANGED


class LoadCancelled(DmabufdError):
    status = grpc.StatusCode.CANCELLED
    reason = Reason.LOAD_CANCELLED


class VerifyFailed(DmabufdError):
    """The loaded bytes differ from the file's."""

    status = grpc.StatusCode.DATA_LOSS
    reason = Reason.VERIFY_FAILED


def bounded(text: str, limit: int = 120) -> str:
    """`text` quoted like repr() for an error message, at most `limit`
    characters between the quotes: a client's path can be 4 KiB of
    anything, and a message echoing it whole buries what went wrong."""
    out: list[str] = []
    used = 0
    cut = False
    for char in text:
        if char in "'\\":
            piece = "\\" + char
        elif char.isprintable():
            piece = char
        else:
            piece = char.encode("unicode_escape").decode("ascii")
        if used + len(piece) > limit:
            cut = True
            break
        out.append(piece)
        used += len(piece)
    if not cut:
        return "'" + "".join(out) + "'"
    return "'" + "".join(out) + f"...' ({len(text)} chars)"
