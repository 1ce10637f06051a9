"""torch tensors over a model dmabufd loaded, without a copy.

`Model.torch(name)` and `Model.state_dict()` call into this module; nothing
else imports it, so `import dmabufd_client` never imports torch (an optional
dependency: `pip install 'dmabufd-client[torch]'`).

Every tensor is a view of the model's buffer: right dtype (BF16 as
torch.bfloat16, F8_E4M3 as torch.float8_e4m3fn, ...), requires_grad False,
and built from a buffer torch can write, so torch never warns that it is
not. What a write does depends on the backend, because the kernel decides
what a second mapping of the buffer may be (docs/loading.md, "The torch
view"):

- memfd ("private"): the tensors sit on a MAP_PRIVATE mapping, so a write
  copies the page it lands on into this process (copy-on-write). The shared
  pages, and every other process, never see it; the other tensors of the
  same Model in this process that share the page do.
- udmabuf, DMA heaps ("refuse"): both refuse MAP_PRIVATE (udmabuf and the
  CMA heap with EINVAL outright, the system heap because remap_pfn_range
  cannot set up a copy-on-write mapping of more than one page), so the
  tensors sit on the Model's shared read-only mapping, and torch is told
  to refuse every access that could write: in-place ops, `out=`, `copy_`,
  item assignment, and also `.data_ptr()`, `.numpy()` and DLPack export
  raise RuntimeError (torch's message: "Cannot access data pointer of
  Tensor ..."), where a write would otherwise be a SIGSEGV.

Conversions such as `.half()`, `.float()` or `.to(dtype)` to another dtype
are not views: torch copies (the result is ordinary, writable memory).
"""

from __future__ import annotations

import ctypes
import fnmatch
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import mmap

    import torch

    from dmabufd_client.loading import TensorInfo

Writes = Literal["private", "refuse"]
WRITE_MODES: tuple[Writes, ...] = ("private", "refuse")

# safetensors dtype -> the name of its torch dtype, looked up on torch when
# used (a torch without one of them says so then, naming the dtype).
TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "BF16": "bfloat16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    # One element holds two 4-bit values, the pair along the last dimension:
    # the file's shape [..., 2n] is [..., n] in torch (as safetensors' own
    # torch loader has it).
    "F4": "float4_e2m1fn_x2",
}
PAIRED_DTYPES = frozenset({"F4"})


def require_torch() -> None:
    """ImportError saying how to get torch, if it is missing."""
    try:
        import torch  # noqa: F401 - only whether it imports
    except ImportError as error:
        raise ImportError(
            "Model.torch() and Model.state_dict() need PyTorch, an optional dependency of dmabufd-client: "
            "pip install 'dmabufd-client[torch]'"
        ) from error


def torch_dtype(dtype: str, name: str) -> torch.dtype:
    """The torch dtype of safetensors `dtype` (tensor `name`'s); TypeError
    if torch has none."""
    require_torch()
    import torch

    attribute = TORCH_DTYPES.get(dtype)
    found = getattr(torch, attribute, None) if attribute is not None else None
    if found is None:
        lacks = f"torch {torch.__version__} lacks torch.{attribute}" if attribute else f"torch has no {dtype} dtype"
        raise TypeError(
            f"tensor {name!r}: {lacks}; model[{name!r}] gives its bytes as numpy uint8, and "
            f"state_dict(exclude=[{name!r}]) leaves it out"
        )
    result: torch.dtype = found
    return result


def torch_shape(info: TensorInfo) -> tuple[int, ...]:
    if info.dtype not in PAIRED_DTYPES:
        return info.shape
    if not info.shape or info.shape[-1] % 2:
        raise TypeError(
            f"tensor {info.name!r}: {info.dtype} of shape {list(info.shape)} has an odd last dimension, and "
            f"torch's {TORCH_DTYPES[info.dtype]} holds pairs along it; model[{info.name!r}] gives its bytes"
        )
    return (*info.shape[:-1], info.shape[-1] // 2)


def writable_window(region: mmap.mmap) -> ctypes.Array[ctypes.c_char]:
    """A buffer over the pages of a read-only mapping that tells torch it
    may write: torch.frombuffer then needs no warning, and the guard set on
    each tensor (see tensor()) keeps torch from ever writing through it."""
    address = np.frombuffer(region, dtype=np.uint8, count=1).ctypes.data
    window = (ctypes.c_char * len(region)).from_address(address)
    # The window does not hold the mapping by itself (from_address takes a
    # bare address), and the mapping must outlive every tensor over it.
    keeper: Any = window
    keeper.region = region
    return window


def tensor(info: TensorInfo, buffer: object, writes: Writes) -> torch.Tensor:
    """A tensor over `info`'s bytes in `buffer` (the mapping of its model
    buffer, or a writable_window of it for "refuse")."""
    require_torch()
    import torch

    if sys.byteorder != "little":
        raise TypeError("safetensors is little-endian; a view on a big-endian machine would read swapped values")
    dtype = torch_dtype(info.dtype, info.name)
    shape = torch_shape(info)
    if info.nbytes == 0:  # holds no bytes (and may have no buffer): nothing to share
        try:
            empty: torch.Tensor = torch.empty(shape, dtype=dtype)
        except (RuntimeError, OverflowError, ValueError):  # dimensions past torch's limits, beside a 0
            empty = torch.empty(0, dtype=dtype)
        return empty
    itemsize = dtype.itemsize
    view: torch.Tensor = torch.frombuffer(
        buffer,  # a mmap or a ctypes array: anything with the buffer protocol
        dtype=dtype,
        count=info.nbytes // itemsize,
        offset=info.offset,
    ).view(shape)
    if writes == "refuse":
        guard = getattr(torch._C, "_set_throw_on_mutable_data_ptr", None)
        if guard is None:  # then a write would be a SIGSEGV: no view at all
            raise RuntimeError(
                f"torch {torch.__version__} cannot refuse writes to a tensor, which a view of {info.name!r} on "
                f"this backend needs: model[{info.name!r}] gives a read-only numpy array"
            )
        # Marks the storage, so every tensor sharing it (views, nn.Parameter)
        # raises instead of writing to a read-only page.
        guard(view)
    return view


def select(names: Iterable[str], prefix: str, exclude: Iterable[str]) -> dict[str, str]:
    """key -> tensor name for Model.state_dict: names with `prefix` (which
    the key drops), minus those `exclude` names or matches."""
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    chosen: dict[str, str] = {}
    for name in names:
        if not name.startswith(prefix):
            continue
        key = name[len(prefix) :]
        if any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(key, p) for p in patterns):
            continue
        chosen[key] = name
    return chosen
