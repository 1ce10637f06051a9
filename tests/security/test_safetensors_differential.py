"""The daemon's safetensors header parser against the reference package.

A file is valid exactly when safetensors (0.8.0, Rust and serde_json) says
so: for every file we generate, valid or broken, the reference rejects it if
and only if our parser raises BadModel (never another exception), and when
both accept, both see the same tensors (name, dtype, shape and bytes) and the
same metadata. Files past our caps are the one exception: we refuse those,
naming the cap.

Generated files start valid (every dtype, zero-size tensors, metadata
variants, the JSON forms serde also reads) and are then mutated: lengths,
offsets, shapes, dtypes, fields, duplicates, nesting, numbers, escapes,
padding, bytes. Hand-written cases pin each bug found so far, and an
end-to-end test sends a few of each kind through a real daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmabufd_client
from dmabufd.loading.safetensors import DTYPE_BITS, MAX_HEADER_BYTES, MAX_TENSORS, BadModel, Header, read_header
from tests.conftest import RunningDaemon

# Repeatable in CI: no example database, no randomness between runs.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
U64_MAX = (1 << 64) - 1

Tensors = list[tuple[str, str, list[int], bytes]]


# -- the two parsers ---------------------------------------------------------------


@contextlib.contextmanager
def memfd_of(data: bytes) -> Iterator[int]:
    fd = os.memfd_create("safetensors-test")
    try:
        os.write(fd, data)
        yield fd
    finally:
        os.close(fd)


# The package's stub leaves it untyped.
deserialize = cast(Callable[[bytes], list[tuple[str, dict[str, Any]]]], safetensors.deserialize)


def reference(data: bytes) -> tuple[Tensors, dict[str, str]] | str:
    """The reference's tensors (sorted by name) and metadata, or its error."""
    try:
        tensors = deserialize(data)
        with memfd_of(data) as fd, safetensors.safe_open(f"/proc/self/fd/{fd}", framework="numpy") as opened:
            metadata = opened.metadata() or {}
    except safetensors.SafetensorError as error:
        return str(error)
    return sorted((name, t["dtype"], list(t["shape"]), bytes(t["data"])) for name, t in tensors), metadata


def ours(data: bytes, **caps: int) -> Header:
    with memfd_of(data) as fd:
        return read_header(fd, len(data), **caps)


def ours_or_refusal(data: bytes, **caps: int) -> Header | BadModel:
    try:
        return ours(data, **caps)
    except BadModel as refusal:  # and nothing else may come out
        return refusal


def agree(data: bytes, *, max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int = MAX_TENSORS) -> None:
    """Assert that both parsers accept `data` and see the same, or both refuse it."""
    expected = reference(data)
    header = ours_or_refusal(data, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
    if isinstance(header, BadModel):
        assert len(str(header)) <= 300, str(header)
        assert isinstance(expected, str), f"we refused what the reference accepts: {header}"
        return
    assert not isinstance(expected, str), f"we accepted what the reference refuses: {expected}"
    tensors = sorted((t.name, t.dtype, list(t.shape), data[t.begin : t.end]) for t in header.tensors)
    assert (tensors, header.metadata) == expected
    assert all(t.begin <= u.begin for t, u in zip(header.tensors, header.tensors[1:], strict=False)), "file order"


# -- building files ---------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text used verbatim: what json.dumps cannot write."""

    text: str


@dataclass
class Obj:
    """A JSON object as pairs, so that keys may repeat."""

    pairs: list[tuple[str | Raw, Any]]


def dump(value: Any, space: str, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        items = (f"{dump(k, space, ascii_only)}:{space}{dump(v, space, ascii_only)}" for k, v in value.pairs)
        return "{" + f",{space}".join(items) + "}"
    if isinstance(value, list):
        return "[" + f",{space}".join(dump(item, space, ascii_only) for item in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@dataclass
class Tensor:
    name: str | Raw
    dtype: Any
    shape: Any
    offsets: Any
    form: str = "object"  # or "array" (serde reads a struct from one) or "dtype-map" ({"F32": null})
    extra: list[tuple[str | Raw, Any]] = field(default_factory=list)
    reversed_fields: bool = False
    missing: str | None = None  # a field left out

    def json(self) -> Any:
        dtype = Obj([(self.dtype, None)]) if self.form == "dtype-map" and isinstance(self.dtype, str) else self.dtype
        pairs: list[tuple[str | Raw, Any]] = [("dtype", dtype), ("shape", self.shape), ("data_offsets", self.offsets)]
        pairs = [(key, value) for key, value in pairs if key != self.missing]
        if self.form == "array":
            return [value for _, value in pairs]
        if self.reversed_fields:
            pairs.reverse()
        return Obj(pairs[:1] + self.extra + pairs[1:])


@dataclass
class Spec:
    # The top-level entries in JSON order: Tensor, or (key, value) for
    # __metadata__ and anything else.
    entries: list[Tensor | tuple[str | Raw, Any]]
    data: bytes
    space: str = ""
    ascii_only: bool = True
    prefix: str = ""
    padding: str = ""

    def tensors(self) -> list[Tensor]:
        return [entry for entry in self.entries if isinstance(entry, Tensor)]

    def header(self) -> bytes:
        pairs = [(e.name, e.json()) if isinstance(e, Tensor) else e for e in self.entries]
        return (self.prefix + dump(Obj(pairs), self.space, self.ascii_only) + self.padding).encode()

    def file(self) -> bytes:
        header = self.header()
        return struct.pack("<Q", len(header)) + header + self.data


def nbits(dtype: str, shape: list[int]) -> int:
    elements = 1
    for dimension in shape:
        elements *= dimension
    return elements * DTYPE_BITS[dtype]


names = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["", "a.weight", "__metadata", "x" * 80])


@st.composite
def tensor_shapes(draw: st.DrawFn, dtype: str) -> list[int]:
    if draw(st.integers(0, 9)) == 0:  # zero-size, with dimensions no buffer could hold
        return draw(st.permutations([0, draw(st.sampled_from([2**40, 2**63, U64_MAX]))]))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    while nbits(dtype, shape) % 8:  # sub-byte elements: pad to whole bytes
        shape = [*shape, 2]
    return shape


@st.composite
def valid_specs(draw: st.DrawFn) -> Spec:
    rng = draw(st.randoms(use_true_random=False))
    names_drawn = draw(st.lists(names, max_size=6, unique=True))
    layout: list[Tensor] = []
    position = 0
    for name in names_drawn:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(tensor_shapes(dtype))
        size = nbits(dtype, shape) // 8
        form = draw(st.sampled_from(["object", "object", "array", "dtype-map"]))
        extra: list[tuple[str | Raw, Any]] = []
        if form != "array" and draw(st.booleans()):
            extra = [("extra", draw(st.sampled_from([None, True, 1.5, -3, "s", [1, [2]], Obj([("k", "v")])])))]
        layout.append(Tensor(name, dtype, shape, [position, position + size], form, extra, draw(st.booleans())))
        position += size
    entries: list[Tensor | tuple[str | Raw, Any]] = list(draw(st.permutations(layout)))
    metadata = draw(st.sampled_from(["absent", "null", "map", "map"]))
    if metadata != "absent":
        value: Any = None
        if metadata == "map":
            value = Obj(draw(st.lists(st.tuples(names, names), max_size=3)))  # keys may repeat: the last wins
        entries.insert(draw(st.integers(0, len(entries))), ("__metadata__", value))
    if layout and draw(st.integers(0, 5)) == 0:  # an earlier entry of the same name, overridden
        original = draw(st.sampled_from(layout))
        shadowed = replace(original, shape=list(original.shape), offsets=[7, 9], extra=[])
        entries.insert(0, shadowed)
    return Spec(
        entries,
        rng.randbytes(position),
        space=draw(st.sampled_from(["", " ", "\n  ", "\t", "\r\n"])),
        ascii_only=draw(st.booleans()),
        prefix=draw(st.sampled_from(["", "", " ", "\n"])),
        padding=draw(st.sampled_from(["", "", " ", "        ", "\n", "\t\r\n "])),
    )


def deep(depth: int, array: bool) -> Raw:
    return Raw("[" * depth + "]" * depth if array else '{"a":' * depth + "1" + "}" * depth)


WEIRD_VALUES = [
    deep(124, True),
    deep(125, True),
    deep(126, True),
    deep(125, False),
    deep(126, False),
    deep(3000, True),
    Raw("9" * 5000),
    Raw("-" + "9" * 400),
    Raw("1" * 309),
    Raw("1" * 310),
    Raw("1e400"),
    Raw("1.7976931348623157e308"),
    Raw("1.7976931348623158e308"),
    Raw("0e99999999999"),
    Raw("1e-99999999999"),
    Raw("NaN"),
    Raw("-Infinity"),
    Raw('"\\ud800"'),
    Raw('"\\udc00x"'),
    Raw('"\\ud83d\\ude00"'),
    Raw('"\\\\ud800"'),
    Raw("-0"),
    Raw("[1,]"),
    Raw('"\x01"'),
]
SHAPE_DIMS = [2**64, U64_MAX, 2**63, 2**61, -1, 2.0, True, "2", None, [2], Raw("-0"), Raw("9" * 5000), Raw("2e0")]
OFFSETS = [-1, U64_MAX, 2**64, 8.0, None, "0", Raw("-0"), Raw("9" * 5000)]
DTYPES = ["f32", "F128", "", "bool", "U4", 17, None, ["F32"], Obj([]), Obj([("F32", 1)]), Obj([("X", None)])]
INFOS = ["x", 1, None, [], ["F32", [2]], ["F32", [2], [0, 8], 1], Obj([])]
METADATA = [[], 1, "s", Obj([("k", 1)]), Obj([("k", None)]), Obj([("k", Obj([]))]), Obj([("k", Raw('"\\udc00"'))])]
NAMES = [Raw('"\\ud800"'), Raw('"a\\u0000b"'), Raw('"\x01"'), Raw('"__metadata\\u005f_"'), Raw('"a\\qb"')]


def pick(draw: st.DrawFn, spec: Spec) -> Tensor | None:
    tensors = spec.tensors()
    return draw(st.sampled_from(tensors)) if tensors else None


def mutate_offsets(draw: st.DrawFn, spec: Spec) -> None:
    if (t := pick(draw, spec)) is not None and isinstance(t.offsets, list):
        choice = draw(st.integers(0, 3))
        at = draw(st.integers(0, 1))
        if choice == 0 and type(t.offsets[at]) is int:
            t.offsets[at] += draw(st.integers(-3, 3))
        elif choice == 1:
            t.offsets[at] = draw(st.sampled_from(OFFSETS))
        elif choice == 2:
            t.offsets.reverse()
        else:
            t.offsets.append(t.offsets[-1])


def mutate_shape(draw: st.DrawFn, spec: Spec) -> None:
    if (t := pick(draw, spec)) is not None and isinstance(t.shape, list):
        choice = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(t.shape) - 1)) if t.shape else 0
        if choice == 0 and t.shape and type(t.shape[at]) is int:
            t.shape[at] += draw(st.sampled_from([-1, 1]))
        elif choice == 1 and t.shape:
            t.shape[at] = draw(st.sampled_from(SHAPE_DIMS))
        elif choice == 2:
            t.shape.insert(draw(st.integers(0, len(t.shape))), draw(st.sampled_from([1, 1, 0, 2])))
        else:
            t.shape = draw(st.sampled_from([None, 2, "2", Obj([])]))


def mutate_dtype(draw: st.DrawFn, spec: Spec) -> None:
    if (t := pick(draw, spec)) is not None:
        t.dtype = draw(st.sampled_from(sorted(DTYPE_BITS)) | st.sampled_from(DTYPES) | names)


def mutate_fields(draw: st.DrawFn, spec: Spec) -> None:
    if (t := pick(draw, spec)) is not None:
        t.form = draw(st.sampled_from(["object", "dtype-map"]))
        choice = draw(st.integers(0, 2))
        if choice == 0:
            t.extra.append((draw(st.sampled_from(["x", "shape", "dtype", "data_offsets"])), t.shape))
        elif choice == 1:
            t.extra.append((draw(st.sampled_from(["x", "y"])), draw(st.sampled_from(WEIRD_VALUES))))
        else:
            t.missing = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))


def mutate_entry(draw: st.DrawFn, spec: Spec) -> None:
    choice = draw(st.integers(0, 4))
    if choice == 0 and spec.entries:
        spec.entries.pop(draw(st.integers(0, len(spec.entries) - 1)))
    elif choice == 1 and spec.entries:
        copy = draw(st.sampled_from(spec.entries))
        spec.entries.insert(draw(st.integers(0, len(spec.entries))), copy)
    elif choice == 2 and (t := pick(draw, spec)) is not None:
        spec.entries[spec.entries.index(t)] = (t.name, draw(st.sampled_from(INFOS)))
    elif choice == 3:
        spec.entries.append(("__metadata__", draw(st.sampled_from(METADATA))))
    elif (t := pick(draw, spec)) is not None:
        t.name = draw(st.sampled_from(NAMES))


def mutate_weird(draw: st.DrawFn, spec: Spec) -> None:
    """One of the values Python and serde_json read differently, somewhere."""
    value = draw(st.sampled_from(WEIRD_VALUES))
    t = pick(draw, spec)
    if t is not None and draw(st.booleans()):
        t.form = "object"
        t.extra.insert(0, ("weird", value))
    else:
        key = draw(st.sampled_from(["__metadata__", "weird"]))
        spec.entries.insert(draw(st.integers(0, len(spec.entries))), (key, Obj([("k", value)])))


SPEC_MUTATIONS: list[Callable[[st.DrawFn, Spec], None]] = [
    mutate_weird,
    mutate_offsets,
    mutate_shape,
    mutate_dtype,
    mutate_fields,
    mutate_entry,
]
HEADER_NOISE = ["{", "}", "[", "]", ",", ":", '"', "\\", " ", "0", "9", "-", ".", "e", "n", "\x00", "\t", "\u00a0"]


def mutate_header(draw: st.DrawFn, header: bytes) -> bytes:
    choice = draw(st.integers(0, 3))
    at = draw(st.integers(0, len(header)))
    if choice == 0:  # insert, replace or delete one character
        noise = draw(st.sampled_from(HEADER_NOISE)).encode()
        return header[:at] + noise + header[at + draw(st.integers(0, 1)) :]
    if choice == 1:  # bytes that are not UTF-8
        return header[:at] + draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82"])) + header[at:]
    if choice == 2:
        return draw(st.sampled_from(["[", "\ufeff", "\x00", "x", "\x0c", "{}"])).encode() + header
    return header + draw(st.sampled_from(["\x00", "\x0b", "\u00a0", "}", ",", "x", "{}", "  \x00"])).encode()


def mutate_file(draw: st.DrawFn, data: bytes) -> bytes:
    (length,) = struct.unpack_from("<Q", data)
    if draw(st.booleans()):
        new = draw(st.sampled_from([0, 1, 2**64 - 1, 100_000_001, length + 1, length - 1, length + 8, len(data)]))
        return struct.pack("<Q", max(0, min(U64_MAX, new))) + data[8:]
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data)))]
    return data + bytes(draw(st.integers(1, 9)))


@st.composite
def broken_files(draw: st.DrawFn) -> bytes:
    spec = draw(valid_specs())
    for _ in range(draw(st.integers(1, 3))):
        draw(st.sampled_from(SPEC_MUTATIONS))(draw, spec)
    header = spec.header()
    if draw(st.integers(0, 2)) == 0:
        header = mutate_header(draw, header)
    data = struct.pack("<Q", len(header)) + header + spec.data
    if draw(st.integers(0, 3)) == 0:
        data = mutate_file(draw, data)
    return data


# -- properties --------------------------------------------------------------------


@settings(FUZZ, max_examples=250)
@given(valid_specs())
def test_valid_files_parse_like_the_reference(spec: Spec) -> None:
    data = spec.file()
    assert not isinstance(reference(data), str), "the generator makes valid files"
    agree(data)


@settings(FUZZ, max_examples=700)
@given(broken_files())
def test_broken_files_are_refused_like_the_reference(data: bytes) -> None:
    agree(data)


@settings(FUZZ, max_examples=150)
@given(valid_specs(), st.integers(40, 400), st.integers(1, 4))
def test_files_past_the_caps_are_refused_naming_the_cap(spec: Spec, max_header_bytes: int, max_tensors: int) -> None:
    data = spec.file()
    entries = sum(1 for e in spec.entries if isinstance(e, Tensor) or e[0] != "__metadata__")
    if len(spec.header()) > max_header_bytes:
        cap = f"more than the {max_header_bytes} this daemon accepts (loading.max_header_bytes)"
    elif entries > max_tensors:
        cap = f"more than {max_tensors} tensors (loading.max_tensors)"
    else:
        agree(data, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
        return
    with pytest.raises(BadModel) as raised:
        ours(data, max_header_bytes=max_header_bytes, max_tensors=max_tensors)
    assert cap in str(raised.value)


# -- hand-written cases: what the reference accepts and refuses ------------------------


def file_of(header: str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def info(dtype: str = "F32", shape: str = "[2]", offsets: str = "[0, 8]", extra: str = "") -> str:
    return f'{{"dtype": "{dtype}", "shape": {shape}, "data_offsets": {offsets}{extra}}}'


def one(extra: str = "", **fields: str) -> str:
    return '{"t": ' + info(**fields, extra=extra) + "}"


CASES: list[tuple[str, bytes, bool]] = [
    # Bugs of the old parser: exceptions other than BadModel...
    ("nesting past Python's recursion limit", file_of(one(', "x": ' + deep(100_000, True).text), bytes(8)), False),
    ("nesting just past serde_json's limit", file_of(one(', "x": ' + deep(126, True).text), bytes(8)), False),
    ("nesting at serde_json's limit", file_of(one(', "x": ' + deep(125, True).text), bytes(8)), True),
    ("an integer of 5000 digits", file_of(one(shape="[" + "9" * 5000 + "]"), bytes(8)), False),
    ("an ignored integer of 5000 digits", file_of(one(', "x": ' + "9" * 5000), bytes(8)), False),
    ("an ignored integer of 300 digits", file_of(one(', "x": ' + "9" * 300), bytes(8)), True),
    ("a float serde_json rounds to infinity", file_of(one(', "x": 1.7976931348623158e308'), bytes(8)), False),
    ("the largest float", file_of(one(', "x": 1.7976931348623157e308'), bytes(8)), True),
    ("a huge exponent of zero", file_of(one(', "x": 0e99999999999999'), bytes(8)), True),
    ("NaN", file_of(one(', "x": NaN'), bytes(8)), False),
    ("a header length past 2**63", file_of("{}", length=2**64 - 1), False),
    # ...and valid files it refused.
    ("only __metadata__", file_of('{"__metadata__": {"a": "b"}}'), True),
    ("__metadata__ null", file_of('{"__metadata__": null}'), True),
    ("nothing at all", file_of("{}"), True),
    ("a zero-size tensor", file_of(one(shape="[0, 3]", offsets="[0, 0]")), True),
    (
        "zero-size tensors only",
        file_of('{"a": ' + info(shape="[0]", offsets="[0, 0]") + ', "b": ["I8", [0], [0, 0]]}'),
        True,
    ),
    ("a zero-size tensor of huge dimensions", file_of(one(shape=f"[0, {U64_MAX}]", offsets="[0, 0]")), True),
    ("overflow before a zero dimension", file_of(one(shape=f"[{2**40}, {2**40}, 0]", offsets="[0, 0]")), False),
    ("17 dimensions", file_of(one(shape="[" + "1, " * 16 + "2]"), bytes(8)), True),
    ("a tensor as an array", file_of('{"t": ["F32", [2], [0, 8]]}', bytes(8)), True),
    ("an array of four", file_of('{"t": ["F32", [2], [0, 8], 0]}', bytes(8)), False),
    (
        "a dtype as a map",
        file_of('{"t": {"dtype": {"F32": null}, "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
        True,
    ),
    (
        "a dtype map with a value",
        file_of('{"t": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}}', bytes(8)),
        False,
    ),
    (
        "a repeated name: the last wins",
        file_of('{"t": ["F32", [2], [0, 8]], "t": ["F32", [1], [0, 4]]}', bytes(4)),
        True,
    ),
    (
        "a repeated name, the first invalid",
        file_of('{"t": ["X", [2], [0, 8]], "t": ["F32", [1], [0, 4]]}', bytes(4)),
        False,
    ),
    ("a repeated __metadata__", file_of('{"__metadata__": {}, "__metadata__": {}}'), False),
    (
        "a repeated field",
        file_of('{"t": {"dtype": "F32", "dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'),
        False,
    ),
    ("a repeated ignored field", file_of(one(', "x": 1, "x": 2'), bytes(8)), True),
    ("whitespace before the object", file_of(" \n\t\r" + one(), bytes(8)), True),
    ("spaces after the object", file_of(one() + "    ", bytes(8)), True),
    ("a NUL after the object", file_of(one() + "\x00", bytes(8)), False),
    ("a form feed before the object", file_of("\x0c" + one(), bytes(8)), False),
    ("a byte-order mark", file_of("\ufeff" + one(), bytes(8)), False),
    ("an array", file_of("[]"), False),
    ("-0 as a dimension", file_of(one(shape="[-0]", offsets="[0, 0]")), False),
    ("2.0 as a dimension", file_of(one(shape="[2.0]")), False),
    ("a negative offset", file_of(one(offsets="[-0, 8]"), bytes(8)), False),
    ("a lone surrogate", file_of('{"__metadata__": {"a": "\\ud800"}}'), False),
    ("a lone surrogate in an ignored field", file_of(one(', "x": ["\\udfff"]'), bytes(8)), False),
    ("a surrogate pair", file_of('{"__metadata__": {"a": "\\ud83d\\ude00"}}'), True),
    ("an escaped backslash before u", file_of('{"__metadata__": {"a": "\\\\ud800"}}'), True),
    ("a metadata value that is not a string", file_of('{"__metadata__": {"a": 1}}'), False),
    ("a gap between tensors", file_of('{"a": ["U8", [1], [0, 1]], "b": ["U8", [1], [2, 3]]}', bytes(3)), False),
    ("overlapping tensors", file_of('{"a": ["U8", [2], [0, 2]], "b": ["U8", [2], [1, 3]]}', bytes(3)), False),
    ("data past the last tensor", file_of(one(), bytes(9)), False),
    ("data and no tensors", file_of("{}", bytes(1)), False),
    (
        "a zero-size tensor off the data's tiling",
        file_of('{"a": ["U8", [0], [1, 1]], "b": ["U8", [2], [0, 2]]}', bytes(2)),
        False,
    ),
    ("a zero-size tensor at the end", file_of('{"a": ["U8", [0], [2, 2]], "b": ["U8", [2], [0, 2]]}', bytes(2)), True),
    ("F4 of 2 elements", file_of(one(dtype="F4", shape="[2, 1]", offsets="[0, 1]"), bytes(1)), True),
    ("F4 of 3 elements", file_of(one(dtype="F4", shape="[3]", offsets="[0, 2]"), bytes(2)), False),
    ("F6 of 4 elements", file_of(one(dtype="F6_E2M3", shape="[2, 2]", offsets="[0, 3]"), bytes(3)), True),
    ("F6 of 2 elements", file_of(one(dtype="F6_E3M2", shape="[2]", offsets="[0, 2]"), bytes(2)), False),
    ("U8 of 2**61 elements: 2**64 bits", file_of(one(dtype="U8", shape=f"[{2**61}]", offsets=f"[0, {2**61}]")), False),
    ("an unknown dtype", file_of(one(dtype="F128"), bytes(8)), False),
    ("a lowercase dtype", file_of(one(dtype="f32"), bytes(8)), False),
    ("a header length past the file", file_of("{}", length=3), False),
    ("a header length of 0", file_of("", b"{}"), False),
    ("fewer than 8 bytes", b"\x02\x00\x00", False),
] + [
    (f"one {dtype}", file_of(one(dtype=dtype, shape="[8]", offsets=f"[0, {bits}]"), bytes(bits)), True)
    for dtype, bits in DTYPE_BITS.items()
]


@pytest.mark.parametrize(("data", "valid"), [pytest.param(d, v, id=label) for label, d, v in CASES])
def test_hand_written_cases(data: bytes, valid: bool) -> None:
    assert isinstance(reference(data), str) is not valid, "the case says what the reference does"
    agree(data)


def test_we_know_every_reference_dtype() -> None:
    error = reference(file_of(one(dtype="nope"), bytes(8)))
    assert isinstance(error, str)
    assert set(re.findall(r"`(\w+)`", error.split("expected one of", 1)[1])) == set(DTYPE_BITS)


# -- end to end: through a real daemon ------------------------------------------------


def valid_file_set() -> dict[str, bytes]:
    rng = random.Random(5)
    every_dtype: list[Tensor | tuple[str | Raw, Any]] = []
    position = 0
    for dtype in DTYPE_BITS:
        shape = [2, 4] if DTYPE_BITS[dtype] < 8 else [3]
        size = nbits(dtype, shape) // 8
        every_dtype.append(Tensor(f"t.{dtype}", dtype, shape, [position, position + size]))
        position += size
    every_dtype.insert(3, Tensor("empty", "BF16", [0, 7], [position, position]))
    every_dtype.append(("__metadata__", Obj([("format", "test"), ("k", "v")])))
    odd_forms = Spec(
        [
            Tensor("a", "I32", [2], [0, 8], form="array"),
            Tensor("b", "F8_E4M3", [3], [8, 11], form="dtype-map", extra=[("x", [1, {"y": None}])]),
            Tensor("z", "U8", [0], [11, 11]),
            Tensor("huge-but-empty", "F32", [U64_MAX, 0], [11, 11]),
            ("__metadata__", None),
        ],
        rng.randbytes(11),
        space="\n  ",
        prefix="  ",
        padding="      ",
    )
    return {
        "metadata-only": Spec([("__metadata__", Obj([("only", "metadata")]))], b"").file(),
        "empty": file_of("{}"),
        "zero-size-only": Spec([Tensor("a", "F32", [0], [0, 0]), Tensor("b", "F4", [0, 9], [0, 0])], b"").file(),
        "every-dtype": Spec(every_dtype, rng.randbytes(position)).file(),
        "odd-forms": odd_forms.file(),
    }


def invalid_file_set() -> dict[str, bytes]:
    return {label: data for label, data, valid in CASES if not valid and "length" not in label}


@pytest.mark.parametrize("label", sorted(valid_file_set()))
def test_daemon_serves_valid_files_like_the_reference(
    client: dmabufd_client.Client, tmp_path: Path, label: str
) -> None:
    data = valid_file_set()[label]
    expected = reference(data)
    assert not isinstance(expected, str), expected
    tensors, metadata = expected
    path = tmp_path / f"{label}.safetensors"
    path.write_bytes(data)
    with client.load_model(path) as model:
        got = sorted((n, model.tensors[n].dtype, list(model.tensors[n].shape), model[n].tobytes()) for n in model)
        assert got == tensors
        assert model.metadata == metadata
        for name, dtype, _, raw in tensors:
            assert model[name].nbytes == len(raw), f"{name}: {dtype} arrives with its bytes"


def test_daemon_refuses_invalid_files_and_keeps_nothing(
    daemon: RunningDaemon, client: dmabufd_client.Client, tmp_path: Path
) -> None:
    for label, data in sorted(invalid_file_set().items()):
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(dmabufd_client.InvalidArgument) as raised:
            client.load_model(path)
        assert len(raised.value.message) <= 300, (label, raised.value.message)
        assert client.stats().models == 0, label
    assert daemon.process.poll() is None
    assert client.heaps(), "the daemon still serves"
