"""What a request routes by: its usage hint, or the NPU buffer type that
stands for one, and the NPU it is for (AllocateRequest, LoadFileRequest and
LoadModelRequest carry the same three fields)."""

from __future__ import annotations

from dmabufd.errors import InvalidRequest
from dmabufd_common import npu
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

RoutedRequest = pb.AllocateRequest | pb.LoadFileRequest | pb.LoadModelRequest


def route_of(request: RoutedRequest, default_usage: str = "") -> tuple[str, int | None]:
    """(the usage, the NPU or None). Raises InvalidRequest when the fields
    contradict each other or name what does not exist."""
    usage = request.usage
    kind = int(request.npu_buffer_type)
    if kind != npu.UNSPECIFIED:
        typed = npu.USAGES.get(kind)
        if typed is None:
            known = ", ".join(npu.android_name(number) for number in npu.USAGES)
            raise InvalidRequest(f"unknown npu_buffer_type {kind}; known: {known}")
        if usage and usage != typed:
            raise InvalidRequest(
                f"usage {usage!r} contradicts npu_buffer_type {npu.android_name(kind)}, which routes as usage "
                f"{typed!r}: give one of them"
            )
        usage = typed
    usage = usage or default_usage
    device = request.npu_device if request.HasField("npu_device") else None
    if device is not None and usage not in npu.TYPE_OF_USAGE:
        usages = ", ".join(npu.USAGES.values())
        raise InvalidRequest(
            f"npu_device needs an NPU buffer type or its usage ({usages}), not usage {usage or 'default'!r}"
        )
    return usage, device
