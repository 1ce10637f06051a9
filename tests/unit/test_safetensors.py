"""The safetensors header parser against well-formed, corrupt and hostile input.

tests/security/test_safetensors_differential.py checks it against the
reference package case by case; these tests pin the messages and the caps.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from dmabufd.loading.safetensors import MAX_HEADER_BYTES, MAX_TENSORS, BadModel, Header, parse_header, read_header


def write(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> int:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return os.open(path, os.O_RDONLY)


def parse(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None, **caps: int) -> Header:
    fd = write(path, header, data, raw_header)
    try:
        return read_header(fd, os.fstat(fd).st_size, **caps)
    finally:
        os.close(fd)


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    return tmp_path / "bad.safetensors"


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
    assert [t.begin for t in header.tensors] == sorted(t.begin for t in header.tensors), "file order"


def tensor(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": tensor(offsets=[0, 16])}, bytes(8), "fall outside the 8-byte data"),
        ({"t": tensor(offsets=[8, 4])}, bytes(8), "end before they begin"),
        ({"t": tensor(offsets=[-8, 0])}, bytes(8), r"data_offsets must be \[begin, end\]"),
        ({"t": tensor(offsets=[4, 12])}, bytes(12), "leave a gap after byte 0"),
        ({"t": tensor(shape=[3])}, bytes(8), "needs 12 bytes"),
        ({"t": tensor(shape=[2**40, 2**40])}, bytes(8), "overflows 64 bits"),
        ({"t": tensor(shape=[2**40, 2**40, 0], offsets=[0, 0])}, b"", "overflows 64 bits"),
        ({"t": tensor(dtype="U8", shape=[2**61], offsets=[0, 0])}, b"", "overflows 64 bits"),
        ({"t": tensor(shape=[-1])}, bytes(8), "integers from 0"),
        ({"t": tensor(shape=[2**64])}, bytes(8), "integers from 0"),
        ({"t": tensor(dtype="F128")}, bytes(8), "not a safetensors dtype"),
        ({"t": tensor(dtype="f32")}, bytes(8), "not a safetensors dtype"),
        ({"t": tensor(dtype="F4", shape=[3], offsets=[0, 2])}, bytes(2), "12 bits, not whole bytes"),
        ({"t": tensor(dtype="F6_E2M3", shape=[2], offsets=[0, 2])}, bytes(2), "multiples of 4"),
        ({"t": tensor(offsets=[0])}, bytes(8), r"\[begin, end\]"),
        ({"t": tensor(offsets=[0, True])}, bytes(8), r"\[begin, end\]"),
        ({"t": "nope"}, b"", "must be an object"),
        ({"t": ["F32", [2]]}, bytes(8), "must be an object"),
        ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), "missing data_offsets"),
        ({"a": tensor(), "b": tensor(offsets=[4, 12])}, bytes(16), "overlap the tensor before"),
        ({"a": tensor(), "b": tensor()}, bytes(8), "overlap the tensor before"),
        ({"t": tensor()}, bytes(9), "cover 8 bytes of data but the file has 9"),
        ({}, bytes(16), "no tensors but 16 bytes"),
        ({"__metadata__": {"k": 1}}, b"", "the value must be a string"),
        ({"__metadata__": ["k"]}, b"", "mapping strings to strings"),
        ([1, 2], b"", r"expected '\{'"),
        ("{}", b"", r"expected '\{'"),
    ],
)
def test_hostile_headers(bad: Path, header: object, data: bytes, message: str) -> None:
    with pytest.raises(BadModel, match=message):
        parse(bad, header, data)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe{", "not valid UTF-8"),
        (b"", r"expected '\{'"),
        (b"{", "expected a tensor name"),
        (b'{"t": 1,}', "must be an object"),
        (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},}', "trailing comma"),
        (b"{}\x00", "data after the header's JSON object"),
        (b"{} {}", "data after the header's JSON object"),
        (b'{"__metadata__": {}, "__metadata__": {}}', "two __metadata__ entries"),
        (b'{"t": {"dtype": "F32", "dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', "dtype is given twice"),
        (b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": NaN}}', "NaN is not a JSON number"),
        (b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": 1e400}}', "out of the range"),
        # serde_json rounds this one up, Python down to the largest f64.
        (b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": 1.7976931348623158e308}}', "out of"),
        (b'{"t": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}', "integers from 0"),
        (b'{"t": {"dtype": "F32", "shape": [0.0], "data_offsets": [0, 0]}}', "integers from 0"),
        (b'{"__metadata__": {"k": "\\ud800"}}', "lone UTF-16 surrogate"),
        (b'{"__metadata__": {"k": "\x01"}}', "Invalid control character"),
        (
            b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": ' + b"[" * 126 + b"]" * 126 + b"}}",
            "128 deep",
        ),
        (
            b'{"t": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0], "x": ' + b"[" * 50000 + b"]" * 50000 + b"}}",
            "deep",
        ),
        (b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}', "out of the range"),
        (b'{"t": {"dtype": "F32", "shape": [' + b"9" * 300 + b'], "data_offsets": [0, 0]}}', "integers from 0"),
    ],
)
def test_hostile_json(bad: Path, raw: bytes, message: str) -> None:
    with pytest.raises(BadModel, match=message):
        parse(bad, None, raw_header=raw)


@pytest.mark.parametrize(
    ("raw", "data", "tensors"),
    [
        (b'{"__metadata__": {"a": "b"}}', b"", []),
        (b'{"__metadata__": null}', b"", []),
        (b"{}", b"", []),
        (b'  \n{"t": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}}  \t\r\n  ', b"", [("t", (0, 5), 0)]),
        (b'{"t": ["U8", [2], [0, 2]]}', bytes(2), [("t", (2,), 2)]),
        (
            b'{"t": {"dtype": {"I16": null}, "shape": [1], "data_offsets": [0, 2], "x": [{"y": 1e300}]}}',
            bytes(2),
            [("t", (1,), 2)],
        ),
        (b'{"t": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}', bytes(3), [("t", (2, 3), 3)]),
        (b'{"t": {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}', bytes(3), [("t", (4,), 3)]),
        (b'{"t": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}', bytes(8), [("t", (1,), 8)]),
        (
            b'{"t": {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]}}',
            b"",
            [("t", (0, 2**64 - 1), 0)],
        ),
        # A repeated name keeps the last entry, as the reference does.
        (b'{"t": ["F32", [2], [0, 8]], "t": ["F32", [1], [0, 4]]}', bytes(4), [("t", (1,), 4)]),
        (b'{"__metadata__": {"k": "\\ud83d\\ude00", "k": "last"}}', b"", []),
    ],
)
def test_valid_headers_the_old_parser_refused(
    bad: Path, raw: bytes, data: bytes, tensors: list[tuple[str, tuple[int, ...], int]]
) -> None:
    header = parse(bad, None, data, raw_header=raw)
    assert [(t.name, t.shape, t.nbytes) for t in header.tensors] == tensors


def test_zero_size_tensors_sit_between_the_others(bad: Path) -> None:
    header = parse(
        bad, {"a": tensor("U8", [0], [0, 0]), "b": tensor("U8", [3], [0, 3]), "c": tensor("U8", [0], [3, 3])}, bytes(3)
    )
    assert [(t.name, t.begin - header.data_start, t.end - header.data_start) for t in header.tensors] == [
        ("a", 0, 0),
        ("b", 0, 3),
        ("c", 3, 3),
    ]
    assert header.metadata == {}


def test_repeated_metadata_keys_keep_the_last(bad: Path) -> None:
    header = parse(bad, None, raw_header=b'{"__metadata__": {"k": "1", "k": "2"}}')
    assert header.metadata == {"k": "2"}


@pytest.mark.parametrize(
    ("length", "message"), [(1 << 40, "safetensors allows at most 100000000"), (1000, "only 2 follow it")]
)
def test_header_length_past_the_file(tmp_path: Path, length: int, message: str) -> None:
    (tmp_path / "bad").write_bytes(struct.pack("<Q", length) + b"{}")
    fd = os.open(tmp_path / "bad", os.O_RDONLY)
    try:
        with pytest.raises(BadModel, match=message):
            read_header(fd, os.fstat(fd).st_size, max_header_bytes=1 << 41)
    finally:
        os.close(fd)


def test_too_short(tmp_path: Path) -> None:
    (tmp_path / "tiny").write_bytes(b"abc")
    fd = os.open(tmp_path / "tiny", os.O_RDONLY)
    try:
        with pytest.raises(BadModel, match="8-byte header length; this file has 3 bytes"):
            read_header(fd, 3)
    finally:
        os.close(fd)


def test_default_caps() -> None:
    assert (MAX_HEADER_BYTES, MAX_TENSORS) == (16 << 20, 65536)


def test_header_cap_is_checked_before_reading(tmp_path: Path) -> None:
    # The length field claims more than the cap; the file is short, so a
    # parser that read first would fail differently.
    (tmp_path / "big").write_bytes(struct.pack("<Q", 1000) + b"{}")
    fd = os.open(tmp_path / "big", os.O_RDONLY)
    try:
        with pytest.raises(BadModel, match=r"1000 bytes, more than the 999 .*loading\.max_header_bytes"):
            read_header(fd, os.fstat(fd).st_size, max_header_bytes=999)
    finally:
        os.close(fd)


def test_tensor_cap_stops_before_the_next_entry(bad: Path) -> None:
    entries = {f"t{i}": tensor("U8", [1], [i, i + 1]) for i in range(3)}
    assert len(parse(bad, entries, bytes(3), max_tensors=3).tensors) == 3
    # The entry past the cap is not even valid JSON: it is never parsed.
    raw = json.dumps(entries).encode()[:-1] + b', "t3": nonsense}'
    with pytest.raises(BadModel, match=r"more than 2 tensors \(loading\.max_tensors\)"):
        parse(bad, None, bytes(3), raw_header=raw, max_tensors=2)
    with pytest.raises(BadModel, match="not valid JSON"):
        parse(bad, None, bytes(3), raw_header=raw, max_tensors=4)
    metadata_is_not_a_tensor = {"__metadata__": {}, "t0": entries["t0"]}
    assert len(parse(bad, metadata_is_not_a_tensor, bytes(1), max_tensors=1).tensors) == 1


@pytest.mark.parametrize(
    "header",
    [
        {"n" * 100_000: tensor(shape=[3])},
        {"\x00\n\U0001f600" * 50_000: tensor(shape=[3])},
        {"t": tensor(dtype="\U0001f600" * 100_000)},
        {"__metadata__": {"k" * 100_000: 1}},
        {"t": tensor(shape=[2] * 100_000)},
        {"t": tensor(shape=[1] * 100_000 + [3])},
    ],
)
def test_messages_stay_short(bad: Path, header: object) -> None:
    with pytest.raises(BadModel) as raised:
        parse(bad, header, bytes(8))
    assert len(str(raised.value)) <= 300, str(raised.value)
    assert "..." in str(raised.value)


def test_a_header_of_nested_arrays_is_refused_before_it_is_parsed() -> None:
    """Two bytes of "[]" cost the JSON parser about a hundred bytes of
    memory, all of it built with the GIL held: such a header is refused by
    counting brackets, not parsed."""
    bomb = b'{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":[' + b"[]," * 200_000 + b"[]]}}"
    bomb += b" " * (-len(bomb) % 8)
    with pytest.raises(BadModel, match=r"brackets for at most 1 tensors"):
        parse_header(bomb, 8 + len(bomb) + 1)


def test_metadata_strings_full_of_braces_still_parse() -> None:
    """A chat template or a JSON config kept as a metadata string is full
    of braces: they are inside a string, and within the slack allowed."""
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}" * 1000
    raw = json.dumps(
        {"__metadata__": {"chat_template": template}, "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    ).encode()
    raw += b" " * (-len(raw) % 8)
    header = parse_header(raw, 8 + len(raw) + 1)
    assert header.metadata["chat_template"] == template
