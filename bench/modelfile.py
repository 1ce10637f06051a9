"""A safetensors model for bench.compare, written by hand to a requested size.

The layout is a decoder-only transformer's (Llama-like names and shapes): token embeddings,
then layers of attention (q/o square, k/v grouped to a quarter of the width), a gated MLP
(gate/up/down at about 2.75x the width) and two norms, a final norm and an output head that
takes up what is left of the size. The width grows with the size so that a 512 MiB model has
about 20 layers, 180-odd tensors, as real checkpoints of that size do. Dtypes mix as in
published checkpoints: attention and embeddings BF16, the MLP F16, norms F32.

The tensor bytes are bench.testfile's pattern (incompressible, written in 8 MiB writes,
fsynced); nothing reads them as numbers.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.testfile import BLOCK, fill_pattern

ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_WRITE_BYTES = 8 << 20
_MAX_WIDTH = 4096
_MIN_WIDTH = 64
_MAX_VOCAB = 32000

Spec = tuple[str, str, tuple[int, ...]]  # name, dtype, shape


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets in the data section, as the header has them
    end: int


@dataclass
class ModelFile:
    path: Path
    size: int  # of the whole file
    data_start: int  # 8 + header length
    tensors: list[Tensor]
    notes: list[str] = field(default_factory=list)

    @property
    def dtypes(self) -> list[str]:
        return sorted({tensor.dtype for tensor in self.tensors})

    def file_range(self, tensor: Tensor) -> tuple[int, int]:
        return self.data_start + tensor.begin, self.data_start + tensor.end


def bf16_arrays() -> str | None:
    """None when safetensors' numpy framework can return BF16 tensors here; else why not.
    numpy has no bfloat16: safetensors asks numpy for it by name, which works once ml_dtypes
    has registered it."""
    with contextlib.suppress(ImportError):
        importlib.import_module("ml_dtypes")
    try:
        np.dtype("bfloat16")
    except TypeError:
        return "numpy has no bfloat16 (ml_dtypes, which adds it, is not installed)"
    return None


def _layer(index: int, width: int, attention: str) -> list[Spec]:
    prefix = f"model.layers.{index}"
    kv = max(width // 4, 1)
    mlp = (width * 11 // 4 + 63) // 64 * 64
    return [
        (f"{prefix}.input_layernorm.weight", "F32", (width,)),
        (f"{prefix}.self_attn.q_proj.weight", attention, (width, width)),
        (f"{prefix}.self_attn.k_proj.weight", attention, (kv, width)),
        (f"{prefix}.self_attn.v_proj.weight", attention, (kv, width)),
        (f"{prefix}.self_attn.o_proj.weight", attention, (width, width)),
        (f"{prefix}.post_attention_layernorm.weight", "F32", (width,)),
        (f"{prefix}.mlp.gate_proj.weight", "F16", (mlp, width)),
        (f"{prefix}.mlp.up_proj.weight", "F16", (mlp, width)),
        (f"{prefix}.mlp.down_proj.weight", "F16", (width, mlp)),
    ]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
    return count * ITEM_BYTES[dtype]


def plan(target: int, attention: str = "BF16") -> list[Spec]:
    """Names, dtypes and shapes whose bytes add up to a little under `target`."""

    def layer_bytes(width: int) -> int:
        return sum(_nbytes(dtype, shape) for _, dtype, shape in _layer(0, width, attention))

    width = _MAX_WIDTH
    # At least 16 layers' worth: real checkpoints have many tensors, not a few huge ones.
    while width > _MIN_WIDTH and layer_bytes(width) * 16 > target:
        width //= 2
    vocab = max(1, min(_MAX_VOCAB, target // 8 // _nbytes(attention, (width,))))
    tensors: list[Spec] = [("model.embed_tokens.weight", attention, (vocab, width))]
    used = _nbytes(attention, (vocab, width))
    final_norm = _nbytes("F32", (width,))
    index = 0
    while used + layer_bytes(width) + final_norm <= target:
        tensors += _layer(index, width, attention)
        used += layer_bytes(width)
        index += 1
    tensors.append(("model.norm.weight", "F32", (width,)))
    used += final_norm
    rows = (target - used) // _nbytes(attention, (width,))
    if rows:
        tensors.append(("lm_head.weight", attention, (rows, width)))
    return tensors


def _header(tensors: list[Tensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt", "generator": "bench.compare"}}
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [tensor.begin, tensor.end],
        }
    text = json.dumps(entries, separators=(",", ":")).encode()
    # The format pads the header with spaces so that the data starts 8-byte aligned.
    return text + b" " * (-len(text) % 8)


def write_model(path: Path, target: int) -> ModelFile:
    """Write a safetensors file of about `target` bytes at `path` (BF16 tensors become F16
    where safetensors' numpy framework cannot return BF16, noted in the result)."""
    notes: list[str] = []
    attention = "BF16"
    missing = bf16_arrays()
    if missing is not None:
        attention = "F16"
        notes.append(f"BF16 tensors written as F16: safetensors.numpy cannot load BF16 here ({missing})")
    tensors: list[Tensor] = []
    offset = 0
    for name, dtype, shape in plan(target, attention):
        size = _nbytes(dtype, shape)
        tensors.append(Tensor(name, dtype, shape, offset, offset + size))
        offset += size
    header = _header(tensors)
    data_start = 8 + len(header)
    model = ModelFile(path, data_start + offset, data_start, tensors, notes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, struct.pack("<Q", len(header)) + header)
        written = 0
        chunk = bytearray(_WRITE_BYTES)
        while written < offset:
            length = min(_WRITE_BYTES, offset - written)
            fill_pattern(chunk, written // BLOCK)
            view = memoryview(chunk)[:length]
            done = 0
            while done < length:
                done += os.pwrite(fd, view[done:], data_start + written + done)
            view.release()
            written += length
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return model
