"""Files and models loaded by dmabufd, as the client sees them.

LoadedFile owns the buffers a LoadFile call made; Model maps tensor names
to read-only numpy arrays over the buffers of a resident model, without
copying. Both close deterministically (close(), or a `with` block).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dmabufd_client.buffer import Buffer
from dmabufd_common import uapi

ProgressCallback = Callable[[int, int], None]

# safetensors dtype -> the numpy dtype its arrays come back as. numpy has no
# bfloat16, float8, float6 or float4: see Model for how those arrive.
NUMPY_DTYPES = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "U16": "<u2",
    "I16": "<i2",
    "F16": "<f2",
    "U32": "<u4",
    "I32": "<i4",
    "F32": "<f4",
    "U64": "<u8",
    "I64": "<i8",
    "F64": "<f8",
    "C64": "<c8",
    "BF16": "<u2",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
    "F8_E8M0": "u1",
    "F8_E4M3FNUZ": "u1",
    "F8_E5M2FNUZ": "u1",
    "F6_E2M3": "u1",
    "F6_E3M2": "u1",
    "F4": "u1",
}
# Elements narrower than a byte: no array of the tensor's shape can hold them.
PACKED_DTYPES = frozenset({"F6_E2M3", "F6_E3M2", "F4"})


@dataclass(frozen=True)
class Segment:
    """`length` file bytes from `file_offset` sit in buffer `buffer_id` at `buffer_offset`."""

    buffer_id: int
    buffer_offset: int
    file_offset: int
    length: int


@dataclass(frozen=True)
class LoadStats:
    method: str
    bytes: int
    wall_seconds: float
    cpu_seconds: float
    verified: bool
    parallelism: int


class LoadedFile:
    def __init__(self, buffers: list[Buffer], segments: list[Segment], stats: LoadStats) -> None:
        self.buffers = buffers
        self.segments = segments
        self.stats = stats

    @property
    def method(self) -> str:
        return self.stats.method

    def buffer_of(self, segment: Segment) -> Buffer:
        return next(buffer for buffer in self.buffers if buffer.id == segment.buffer_id)

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()

    def __enter__(self) -> LoadedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    buffer_id: int
    offset: int
    nbytes: int


class Model(Mapping[str, Any]):
    """Tensor name -> read-only numpy array backed by the model's buffers.

    Dtypes numpy lacks arrive as their raw bits, in an array of the tensor's
    shape: BF16 as uint16, the F8 types (F8_E4M3, F8_E5M2, F8_E8M0 and the
    FNUZ ones) as uint8; view them with ml_dtypes or torch. Sub-byte dtypes
    (F4, F6_E2M3, F6_E3M2) arrive as a flat uint8 array of the packed bytes,
    as the file stores them. A zero-size tensor whose other dimensions are
    too large for numpy (safetensors allows up to 2**64-1) arrives flat.
    """

    def __init__(
        self,
        model_id: int,
        fds: dict[int, int],
        tensors: list[TensorInfo],
        metadata: dict[str, str],
        *,
        shared: bool,
        read_only_enforced: bool,
        dma_buf: bool,
        stats: LoadStats,
        release: Callable[[int], None],
    ) -> None:
        self.id = model_id
        self.tensors = {tensor.name: tensor for tensor in tensors}
        self.metadata = metadata
        self.shared = shared
        self.read_only_enforced = read_only_enforced
        self.stats = stats
        self._release = release
        self._fds = fds
        self._dma_buf = dma_buf
        self._maps: dict[int, mmap.mmap] = {}
        for buffer_id, fd in fds.items():
            size = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
            self._maps[buffer_id] = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            if dma_buf:  # CPU reads for the model's lifetime: one sync bracket around it
                uapi.dma_buf_sync(fd, uapi.SyncFlags.START | uapi.SyncFlags.READ)
        self._arrays: dict[str, Any] = {}
        self._closed = False

    def __getitem__(self, name: str) -> Any:
        array = self._arrays.get(name)
        if array is None:
            tensor = self.tensors[name]
            dtype = np.dtype(NUMPY_DTYPES[tensor.dtype])
            shape = (tensor.nbytes,) if tensor.dtype in PACKED_DTYPES else tensor.shape
            if tensor.nbytes == 0:  # holds no bytes, so it may have no buffer either
                try:
                    array = np.empty(shape, dtype)
                except ValueError:  # dimensions past numpy's limits, beside a 0
                    array = np.empty(0, dtype)
                array.flags.writeable = False
            else:
                region = self._maps[tensor.buffer_id]
                array = np.frombuffer(
                    region, dtype=dtype, count=tensor.nbytes // dtype.itemsize, offset=tensor.offset
                ).reshape(shape)
            self._arrays[name] = array
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def close(self) -> None:
        """Release the model in the daemon, then the mappings and fds.
        Arrays still referenced elsewhere keep their mapping alive."""
        if self._closed:
            return
        self._closed = True
        self._arrays.clear()
        try:
            self._release(self.id)
        finally:
            for buffer_id, fd in self._fds.items():
                if self._dma_buf:
                    uapi.dma_buf_sync(fd, uapi.SyncFlags.END | uapi.SyncFlags.READ)
                # BufferError: an array over it is still alive; the mapping goes with it.
                with contextlib.suppress(BufferError):
                    self._maps[buffer_id].close()
                os.close(fd)
            self._fds = {}

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
