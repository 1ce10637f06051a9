"""Errors a client sees: one class per gRPC status the daemon uses, each
carrying the status and the daemon's message."""

from __future__ import annotations

import grpc


class DmabufdError(Exception):
    """Base class. `status` is the gRPC status code (or None for errors
    raised on the client side before anything was sent)."""

    status: grpc.StatusCode | None = None

    def __init__(self, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(DmabufdError, ValueError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DmabufdError):
    status = grpc.StatusCode.NOT_FOUND


class PermissionDenied(DmabufdError):
    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(DmabufdError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(DmabufdError):
    """The request is valid but not in this state (a pool buffer released
    alone, a read-only grant of a dma-buf, a file that changed)."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(DmabufdError, ValueError):
    status = grpc.StatusCode.OUT_OF_RANGE


class DataLoss(DmabufdError):
    """Loaded bytes differ from the file's (verify)."""

    status = grpc.StatusCode.DATA_LOSS


class Unauthenticated(DmabufdError):
    status = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(DmabufdError):
    status = grpc.StatusCode.UNAVAILABLE


class ProtocolError(DmabufdError):
    """The fd socket said something this client does not understand."""


_BY_STATUS: dict[grpc.StatusCode, type[DmabufdError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        OutOfRange,
        DataLoss,
        Unauthenticated,
        Unavailable,
    )
    if cls.status is not None
}


def from_rpc_error(error: grpc.RpcError) -> DmabufdError:
    """The typed error for a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    return _BY_STATUS.get(code, DmabufdError)(details, code)


def from_status_value(value: int, message: str) -> DmabufdError:
    """The typed error for a numeric status received in an ERROR frame."""
    code = next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
    return _BY_STATUS.get(code, DmabufdError)(message, code)
