"""Errors a client sees: one class per gRPC status the daemon uses, and
below those, one class per reason the daemon gives (its rich error model:
a google.rpc.Status with an ErrorInfo, see dmabufd_common.reasons).

    DmabufdError
      InvalidArgument
      NotFound:            HeapNotFound, BufferNotFound, FileNotFound
      PermissionDenied:    AccessDenied
      ResourceExhausted:   QuotaExceeded, HeapOutOfMemory, Overloaded
      FailedPrecondition:  BufferBusy, FileChanged
      OutOfRange
      DataLoss:            VerifyFailed
      Unauthenticated:     SessionInvalid
      Unavailable:         HeapUnavailable, DeliveryFailed
      ProtocolError

Catch a status class to handle every reason it covers (code written
before reasons existed keeps working: a QuotaExceeded is a
ResourceExhausted); catch a reason class to tell them apart: a quota
denial (release something) from a heap out of memory (try another heap,
or later) from a per-uid limit (slow down). An error with a reason this
client does not know, or from a daemon that sends none, is raised as its
status class, with `reason` still set when there was one.
"""

from __future__ import annotations

from typing import ClassVar

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from dmabufd_common.reasons import DOMAIN, Reason


class DmabufdError(Exception):
    """Base class. `status` is the gRPC status code (or None for errors
    raised on the client side before anything was sent). `reason` is the
    daemon's ErrorInfo reason (a dmabufd_common.reasons.Reason value, or
    None), `metadata` its ErrorInfo metadata (such as "uid"), and
    `quota_violations` the (subject, description) pairs of a QuotaFailure
    (subject "uid:<uid>")."""

    status: grpc.StatusCode | None = None
    # The reason a subclass stands for (None: a status class).
    REASON: ClassVar[Reason | None] = None

    def __init__(
        self,
        message: str,
        status: grpc.StatusCode | None = None,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        quota_violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.reason: str | None = reason if reason is not None else self.REASON
        self.metadata: dict[str, str] = dict(metadata or {})
        self.quota_violations = quota_violations

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


# -- by reason ----------------------------------------------------------


class HeapNotFound(NotFound):
    """No present heap by that name, alias or usage route."""

    REASON = Reason.HEAP_NOT_FOUND


class BufferNotFound(NotFound):
    """The session holds no buffer (pool, model, grant) by that id."""

    REASON = Reason.BUFFER_NOT_FOUND


class FileNotFound(NotFound):
    """The file to load does not exist, or this client cannot see it."""

    REASON = Reason.FILE_NOT_FOUND


class AccessDenied(PermissionDenied):
    """The daemon's policy refuses this client (heaps.access, loading roots)."""

    REASON = Reason.ACCESS_DENIED


class QuotaExceeded(ResourceExhausted):
    """The uid's memory quota (or the resident-model budget) would be
    passed: release buffers, and close their fds and mappings."""

    REASON = Reason.QUOTA_EXCEEDED


class HeapOutOfMemory(ResourceExhausted):
    """The kernel could not provide the memory (ENOMEM, ENOSPC): another
    heap, smaller buffers, or later."""

    REASON = Reason.HEAP_OUT_OF_MEMORY


class Overloaded(ResourceExhausted):
    """A per-uid limit on the daemon itself (calls in flight, streams,
    sessions): make fewer calls at once; allocating less will not help."""

    REASON = Reason.OVERLOADED


class BufferBusy(FailedPrecondition):
    """The buffer belongs to a pool: release the pool."""

    REASON = Reason.BUFFER_BUSY


class FileChanged(FailedPrecondition):
    """The file changed (truncated, replaced) while it was being loaded."""

    REASON = Reason.FILE_CHANGED


class VerifyFailed(DataLoss):
    """The loaded bytes differ from the file's."""

    REASON = Reason.VERIFY_FAILED


class SessionInvalid(Unauthenticated):
    """The session is gone (or the call's ticket never arrived): connect again."""

    REASON = Reason.SESSION_INVALID


class HeapUnavailable(Unavailable):
    """The heap exists but cannot serve now (removed, failing)."""

    REASON = Reason.HEAP_UNAVAILABLE


class DeliveryFailed(Unavailable):
    """The daemon could not send the fds on this session's fd socket."""

    REASON = Reason.DELIVERY_FAILED


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
_BY_REASON: dict[str, type[DmabufdError]] = {
    cls.REASON: cls
    for cls in (
        HeapNotFound,
        BufferNotFound,
        FileNotFound,
        AccessDenied,
        QuotaExceeded,
        HeapOutOfMemory,
        Overloaded,
        BufferBusy,
        FileChanged,
        VerifyFailed,
        SessionInvalid,
        HeapUnavailable,
        DeliveryFailed,
    )
    if cls.REASON is not None
}


def error_class(code: grpc.StatusCode, reason: str | None) -> type[DmabufdError]:
    """The class for a status and reason: the reason's, if it is known and
    goes with that status (a daemon's bug or a newer daemon must not turn a
    NOT_FOUND into a ResourceExhausted), else the status's."""
    by_status = _BY_STATUS.get(code, DmabufdError)
    by_reason = _BY_REASON.get(reason or "")
    if by_reason is not None and by_reason.status == code:
        return by_reason
    return by_status


def from_rpc_error(error: grpc.RpcError) -> DmabufdError:
    """The typed error for a failed call, with the reason, metadata and
    quota violations of its rich status when the daemon sent one."""
    if not isinstance(error, grpc.Call):
        return DmabufdError(str(error), grpc.StatusCode.UNKNOWN)
    code = error.code()
    details = error.details() or str(error)
    reason, metadata, violations = _rich_details(error)
    return error_class(code, reason)(details, code, reason=reason, metadata=metadata, quota_violations=violations)


def _rich_details(call: grpc.Call) -> tuple[str | None, dict[str, str], tuple[tuple[str, str], ...]]:
    """(reason, metadata, quota violations) from the call's
    grpc-status-details-bin trailer; nothing when it is missing, malformed,
    or disagrees with the call's status (from_call raises ValueError then)."""
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        return None, {}, ()
    if status is None:
        return None, {}, ()
    return _details_of(status)


def _details_of(status: status_pb2.Status) -> tuple[str | None, dict[str, str], tuple[tuple[str, str], ...]]:
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN and reason is None:
                reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            violations += [(violation.subject, violation.description) for violation in failure.violations]
    return reason, metadata, tuple(violations)


def from_status_bytes(data: bytes) -> DmabufdError:
    """The typed error for a serialized google.rpc.Status (a REPLY frame's
    body): the same class, reason and details a gRPC call's trailer gives."""
    status = status_pb2.Status()
    try:
        status.ParseFromString(data)
    except DecodeError:
        return ProtocolError("dmabufd sent a REPLY whose status does not parse")
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    reason, metadata, violations = _details_of(status)
    error = error_class(code, reason)
    return error(status.message, code, reason=reason, metadata=metadata, quota_violations=violations)


def from_status_value(value: int, message: str) -> DmabufdError:
    """The typed error for a numeric status received in an ERROR frame
    (which carries no reason)."""
    code = next((c for c in grpc.StatusCode if c.value[0] == value), grpc.StatusCode.UNKNOWN)
    return _BY_STATUS.get(code, DmabufdError)(message, code)
