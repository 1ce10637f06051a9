"""Errors the daemon reports to clients, each with its gRPC status.

Raise these anywhere below the API layer; api/servicer.py turns them into
the call's status and message. Messages are for people: say what was wrong
and what to do instead.
"""

from __future__ import annotations

import grpc


class DmabufdError(Exception):
    """Base of every error a client may see."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidRequest(DmabufdError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class HeapNotFound(DmabufdError):
    status = grpc.StatusCode.NOT_FOUND


class BufferNotFound(DmabufdError):
    status = grpc.StatusCode.NOT_FOUND


class AccessDenied(DmabufdError):
    status = grpc.StatusCode.PERMISSION_DENIED


class QuotaExceeded(DmabufdError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(DmabufdError):
    """A per-uid limit on the daemon's own resources (calls, streams,
    sessions, outbox): the client must slow down, not allocate less."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class BufferBusy(DmabufdError):
    """The buffer is part of something larger (a pool) that must be released whole."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class OutOfMemory(DmabufdError):
    """The kernel could not provide the memory."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class SessionInvalid(DmabufdError):
    """Missing, unknown or closed session, or a ticket that does not prove
    the caller holds the session's fd socket."""

    status = grpc.StatusCode.UNAUTHENTICATED


class HeapUnavailable(DmabufdError):
    """A heap that exists but cannot serve right now (removed, failing)."""

    status = grpc.StatusCode.UNAVAILABLE


class DeliveryFailed(DmabufdError):
    """The fds could not be sent on the session's fd socket."""

    status = grpc.StatusCode.UNAVAILABLE


class ConfigError(Exception):
    """The configuration file is wrong; raised at start-up, never to clients."""


class OutOfRange(DmabufdError):
    """An offset or length outside the file."""

    status = grpc.StatusCode.OUT_OF_RANGE


class FileNotFound(DmabufdError):
    status = grpc.StatusCode.NOT_FOUND


class FileChanged(DmabufdError):
    """The file changed under a load (truncated, replaced)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class LoadCancelled(DmabufdError):
    status = grpc.StatusCode.CANCELLED


class VerifyFailed(DmabufdError):
    """The loaded bytes differ from the file's."""

    status = grpc.StatusCode.DATA_LOSS


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
