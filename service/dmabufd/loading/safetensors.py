"""The safetensors format's header, read and validated.

Layout: an 8-byte little-endian header length N, N bytes of JSON, then the
data. The JSON maps tensor names to {"dtype", "shape", "data_offsets":
[begin, end]} (offsets relative to the data start) plus an optional
"__metadata__" map of strings. The header is untrusted input: every offset,
size and shape is checked before anything is allocated.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass

from dmabufd.errors import InvalidRequest

# The reference implementation refuses headers larger than this too.
MAX_HEADER_BYTES = 100 << 20
MAX_TENSORS = 1 << 20
MAX_RANK = 16

DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


class BadModel(InvalidRequest):
    """A safetensors file that is malformed or hostile."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # Offsets in the file (not relative to the data section).
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    data_start: int
    tensors: tuple[TensorEntry, ...]  # in file order
    metadata: dict[str, str]


def read_header(fd: int, file_size: int) -> Header:
    if file_size < 8:
        raise BadModel(f"a safetensors file has at least 8 bytes; this one has {file_size}")
    length = int.from_bytes(os.pread(fd, 8, 0), "little")
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise BadModel(f"header length {length} is impossible for a {file_size}-byte file")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise BadModel("the file ended inside its header")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadModel(f"header is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise BadModel("header is not a JSON object")
    return parse_header(document, 8 + length, file_size)


def _metadata(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadModel("__metadata__ must map strings to strings")
    return dict(value)


def parse_header(document: dict[str, object], data_start: int, file_size: int) -> Header:
    data_size = file_size - data_start
    metadata = _metadata(document.get("__metadata__", {}))
    entries = [(name, spec) for name, spec in document.items() if name != "__metadata__"]
    if len(entries) > MAX_TENSORS:
        raise BadModel(f"{len(entries)} tensors is more than {MAX_TENSORS}")
    tensors: list[TensorEntry] = []
    for name, spec in entries:
        if not isinstance(spec, dict):
            raise BadModel(f"tensor {name!r}: not an object")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise BadModel(f"tensor {name!r}: unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise BadModel(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise BadModel(f"tensor {name!r}: data_offsets must be [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise BadModel(f"tensor {name!r}: data_offsets [{begin}, {end}] fall outside the {data_size}-byte data")
        expected = math.prod(shape) * DTYPE_SIZES[str(dtype)]
        if expected != end - begin:
            raise BadModel(f"tensor {name!r}: {dtype} {shape} needs {expected} bytes, data_offsets give {end - begin}")
        tensors.append(TensorEntry(name, str(dtype), tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda tensor: (tensor.begin, tensor.end))
    for previous, current in itertools.pairwise(tensors):
        if current.begin < previous.end:
            raise BadModel(f"tensors {previous.name!r} and {current.name!r} overlap")
    return Header(data_start, tuple(tensors), metadata)
