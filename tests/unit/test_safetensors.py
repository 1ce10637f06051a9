"""The safetensors header parser against well-formed, corrupt and hostile input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from dmabufd.loading.safetensors import BadModel, read_header


def write(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> int:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return os.open(path, os.O_RDONLY)


def parse(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> object:
    fd = write(path, header, data, raw_header)
    try:
        return read_header(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_reads_what_the_reference_writer_wrote(tmp_path: Path) -> None:
    tensors: dict[str, Any] = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(5, dtype=np.int64)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "np"})
    fd = os.open(tmp_path / "m.safetensors", os.O_RDONLY)
    try:
        header = read_header(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert header.metadata == {"format": "np"}
    by_name = {t.name: t for t in header.tensors}
    assert by_name["b"].shape == (2, 3)
    assert by_name["b"].dtype == "F32"
    assert by_name["a"].nbytes == 40
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert raw[by_name["b"].begin : by_name["b"].end] == tensors["b"].tobytes()


def tensor(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": tensor(offsets=[0, 16])}, bytes(8), "fall outside"),
        ({"t": tensor(offsets=[8, 4])}, bytes(8), "fall outside"),
        ({"t": tensor(offsets=[-8, 0])}, bytes(8), "fall outside"),
        ({"t": tensor(shape=[3])}, bytes(8), "needs 12 bytes"),
        ({"t": tensor(shape=[2**40, 2**40])}, bytes(8), "needs"),
        ({"t": tensor(shape=[-1])}, bytes(8), "non-negative"),
        ({"t": tensor(shape=[1] * 17)}, bytes(8), "at most 16"),
        ({"t": tensor(dtype="F128")}, bytes(8), "unknown dtype"),
        ({"t": tensor(offsets=[0])}, bytes(8), r"\[begin, end\]"),
        ({"t": tensor(offsets=[0, True])}, bytes(8), r"\[begin, end\]"),
        ({"t": "nope"}, b"", "not an object"),
        ({"a": tensor(), "b": tensor(offsets=[4, 12])}, bytes(16), "overlap"),
        ({"__metadata__": {"k": 1}}, b"", "strings to strings"),
        ([1, 2], b"", "not a JSON object"),
    ],
)
def test_hostile_headers(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    with pytest.raises(BadModel, match=message):
        parse(tmp_path / "bad.safetensors", header, data)


def test_header_length_past_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    fd = os.open(tmp_path / "bad", os.O_RDONLY)
    try:
        with pytest.raises(BadModel, match="impossible"):
            read_header(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_not_json(tmp_path: Path) -> None:
    with pytest.raises(BadModel, match="not valid JSON"):
        parse(tmp_path / "bad", None, raw_header=b"\xff\xfe{")


def test_too_short(tmp_path: Path) -> None:
    (tmp_path / "tiny").write_bytes(b"abc")
    fd = os.open(tmp_path / "tiny", os.O_RDONLY)
    try:
        with pytest.raises(BadModel, match="at least 8 bytes"):
            read_header(fd, 3)
    finally:
        os.close(fd)
