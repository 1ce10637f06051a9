"""Python client for dmabufd: sessions, buffers that own their fds, typed errors."""

from dmabufd_client.buffer import Access, Backend, Buffer, BufferInfo, Mapping
from dmabufd_client.client import Client, HeapEvent, HeapInfo, connect
from dmabufd_client.errors import (
    DataLoss,
    DmabufdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from dmabufd_client.loading import LoadedFile, Model, Segment
from dmabufd_client.pools import Grant, GrantOffer, PlanePlacement, Pool, Redeemed

__all__ = [
    "Access",
    "Backend",
    "Buffer",
    "BufferInfo",
    "Client",
    "DataLoss",
    "DmabufdError",
    "FailedPrecondition",
    "Grant",
    "GrantOffer",
    "HeapEvent",
    "HeapInfo",
    "InvalidArgument",
    "LoadedFile",
    "Mapping",
    "Model",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PlanePlacement",
    "Pool",
    "ProtocolError",
    "Redeemed",
    "ResourceExhausted",
    "Segment",
    "Unauthenticated",
    "Unavailable",
    "connect",
]
