"""NPU buffer types on the client side: what a request says, and how
Android's dma_heap.json routes them in the daemon (ListHeaps)."""

from __future__ import annotations

from dataclasses import dataclass

from dmabufd_client.errors import InvalidArgument
from dmabufd_common import npu
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

# A type by Android's name ("MODEL_WEIGHTS", any case) or number.
NpuBufferTypeLike = str | int
MAX_NPU_DEVICE = (1 << 32) - 1


@dataclass(frozen=True)
class NpuRoute:
    """dma_heap.json's heaps for one buffer type on one NPU."""

    buffer_type: str  # Android's name, e.g. "MODEL_WEIGHTS"
    npu_device: int
    usage: str  # the usage hint the type routes as
    heap_order: tuple[str, ...]


@dataclass(frozen=True)
class NpuRouting:
    """The daemon's dma_heap.json routes; `source` is the file ("": none was read)."""

    source: str
    routes: tuple[NpuRoute, ...]


def npu_routing(response: pb.ListHeapsResponse) -> NpuRouting:
    routes = tuple(
        NpuRoute(npu.android_name(route.buffer_type), route.npu_device, route.usage, tuple(route.heap_order))
        for route in response.npu_routes
    )
    return NpuRouting(response.dma_heap_json, routes)


def set_npu_fields(
    request: pb.AllocateRequest | pb.LoadFileRequest | pb.LoadModelRequest,
    buffer_type: NpuBufferTypeLike | None,
    device: int | None,
) -> None:
    """Fill a request's npu_buffer_type and npu_device (None: leave unset)."""
    if buffer_type is not None:
        try:
            request.npu_buffer_type = pb.NpuBufferType.ValueType(npu.buffer_type(buffer_type))
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
    if device is not None:
        if isinstance(device, bool) or not 0 <= device <= MAX_NPU_DEVICE:
            raise InvalidArgument(f"npu_device must be an NPU number from 0 to {MAX_NPU_DEVICE}, not {device!r}")
        request.npu_device = device
