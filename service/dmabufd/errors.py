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
