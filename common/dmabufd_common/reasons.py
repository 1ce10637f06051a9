"""Why a call failed: the reasons of dmabufd's rich error model, shared by
the daemon (which sends them) and the clients (which map them to typed
exceptions).

A failed call's status carries a `google.rpc.Status` in its
`grpc-status-details-bin` trailer (the gRPC "rich error model"), whose
details hold one `google.rpc.ErrorInfo`:

- `domain` is always DOMAIN;
- `reason` is one of the Reason values below: a stable, machine-readable
  name, finer than the status code (RESOURCE_EXHAUSTED alone cannot tell a
  quota from a heap out of memory);
- `metadata` may add context: for QUOTA_EXCEEDED, `uid` (the caller's).

A quota denial adds a `google.rpc.QuotaFailure` whose one violation has the
subject `uid:<uid>` (QUOTA_SUBJECT_PREFIX) and the message as description.
(The uid of the loading.model_budget_bytes denial is the caller's too,
though that budget is the daemon's, not the uid's.)

The reasons are part of the API: a value is never renamed or reused, new
ones may be added (a client must treat an unknown reason like a missing
one, by its status code). protos/dmabufd/v1/dmabufd.proto lists them for
clients in other languages; a test keeps that list and this one equal.
"""

from __future__ import annotations

from enum import StrEnum

DOMAIN = "dmabufd.dev"
QUOTA_SUBJECT_PREFIX = "uid:"


class Reason(StrEnum):
    """ErrorInfo.reason values, each with the status code it comes with."""

    # INVALID_ARGUMENT: the request itself is wrong (a size, a name, a count).
    INVALID_REQUEST = "INVALID_REQUEST"
    # NOT_FOUND: no present heap by that name, alias or usage route.
    HEAP_NOT_FOUND = "HEAP_NOT_FOUND"
    # NOT_FOUND: the session holds no buffer (or pool, model, grant) by that id.
    BUFFER_NOT_FOUND = "BUFFER_NOT_FOUND"
    # NOT_FOUND: the file a load names does not exist (or is not visible to the caller).
    FILE_NOT_FOUND = "FILE_NOT_FOUND"
    # PERMISSION_DENIED: the policy refuses the caller (heaps.access, loading roots, file modes).
    ACCESS_DENIED = "ACCESS_DENIED"
    # RESOURCE_EXHAUSTED: the uid's memory quota ([quota]) or the model budget would be passed.
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    # RESOURCE_EXHAUSTED: the kernel could not provide the memory (ENOMEM, ENOSPC).
    HEAP_OUT_OF_MEMORY = "HEAP_OUT_OF_MEMORY"
    # RESOURCE_EXHAUSTED: a per-uid limit on the daemon itself ([limits]): slow down.
    OVERLOADED = "OVERLOADED"
    # FAILED_PRECONDITION: the buffer belongs to a pool and is released with it.
    BUFFER_BUSY = "BUFFER_BUSY"
    # FAILED_PRECONDITION: a read-only grant the kernel cannot enforce (a dma-buf, not a memfd).
    NOT_ENFORCEABLE = "NOT_ENFORCEABLE"
    # FAILED_PRECONDITION: the file changed (truncated, replaced) under a load.
    FILE_CHANGED = "FILE_CHANGED"
    # OUT_OF_RANGE: an offset or length outside the file.
    OUT_OF_RANGE = "OUT_OF_RANGE"
    # UNAUTHENTICATED: a missing, unknown or closed session, or a ticket that does not prove it.
    SESSION_INVALID = "SESSION_INVALID"
    # UNAVAILABLE: the heap exists but cannot serve now (removed, failing).
    HEAP_UNAVAILABLE = "HEAP_UNAVAILABLE"
    # UNAVAILABLE: the fds could not be sent on the session's fd socket.
    DELIVERY_FAILED = "DELIVERY_FAILED"
    # CANCELLED: the load was cancelled (by the client, or its deadline).
    LOAD_CANCELLED = "LOAD_CANCELLED"
    # DATA_LOSS: the loaded bytes differ from the file's (verify).
    VERIFY_FAILED = "VERIFY_FAILED"
    # INTERNAL: a bug in the daemon; its log has the traceback.
    INTERNAL = "INTERNAL"
