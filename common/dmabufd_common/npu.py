"""NPU buffer types, as the API carries them and as Android names them.

The proto enum NpuBufferType is the one source of names and numbers. Its
values are Android's BufferType (package android.os.dma_heap: what
/vendor/etc/dma_heap.json lists) with the API's prefix, and the same
numbers, except that buf's lint rules make the zero value UNSPECIFIED where
Android says UNKNOWN. Each type stands for one usage hint, so a request that
gives a type routes exactly as a request with that usage.
"""

from __future__ import annotations

from dmabufd_common.api.v1 import dmabufd_pb2 as pb

PREFIX = "NPU_BUFFER_TYPE_"
UNSPECIFIED = pb.NPU_BUFFER_TYPE_UNSPECIFIED
ANDROID_ZERO_NAME = "UNKNOWN"

# Android's names (dma_heap.json's, without our prefix) -> numbers.
ANDROID_NAMES: dict[str, int] = {
    (ANDROID_ZERO_NAME if number == UNSPECIFIED else name.removeprefix(PREFIX)): number
    for name, number in pb.NpuBufferType.items()
}

# The usage hint each type stands for. model-weights existed before NPU
# types did; the others say "npu" where a bare word (cache) would be vague.
USAGES: dict[int, str] = {
    pb.NPU_BUFFER_TYPE_MODEL_EXECUTABLE: "model-executable",
    pb.NPU_BUFFER_TYPE_MODEL_WEIGHTS: "model-weights",
    pb.NPU_BUFFER_TYPE_CACHE: "npu-cache",
    pb.NPU_BUFFER_TYPE_AUXILIARY: "npu-auxiliary",
}
TYPE_OF_USAGE: dict[str, int] = {usage: number for number, usage in USAGES.items()}


def android_name(number: int) -> str:
    """Android's name of a buffer type ("MODEL_WEIGHTS"), or the number as text."""
    return next((name for name, value in ANDROID_NAMES.items() if value == number), str(number))


def buffer_type(value: str | int) -> int:
    """A buffer type from Android's name (any case), the API's full name, or
    its number. Raises ValueError naming the choices."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        name = value.strip().upper()
        number = ANDROID_NAMES.get(name.removeprefix(PREFIX), -1)
    else:
        number = -1
    if number not in USAGES:
        choices = ", ".join(android_name(number) for number in USAGES)
        raise ValueError(f"unknown NPU buffer type {value!r}; known: {choices}")
    return number
