"""The safetensors format's header, read and validated.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then
the data. The JSON maps tensor names to {"dtype", "shape", "data_offsets":
[begin, end]} (offsets relative to the data start) plus an optional
"__metadata__" map of strings to strings (or null).

The header is untrusted input. The rule is: accept exactly what the
reference implementation (safetensors 0.8.0, Rust, serde_json) accepts, and
refuse everything else with BadModel, never another exception. That means
mirroring serde_json where Python's json module differs: nesting is limited
to 127 levels, numbers out of f64 range are errors (with serde_json's own
rounding), lone surrogate escapes are errors, `-0` is not an integer, a
tensor may also be given as the array [dtype, shape, data_offsets] and a
dtype as {"F32": null}; duplicate tensor names keep the last entry (each
must still be valid), a duplicate __metadata__ or field is an error, unknown
fields are ignored. Tensors must tile the data section exactly: sorted by
offsets, each begins where the previous ended, from 0 to the end of file.

Cost is linear in the header and bounded by the caps, which are checked
before the work they bound.
"""

from __future__ import annotations

import itertools
import json
import json.scanner
import math
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from dmabufd.errors import InvalidRequest

MAX_HEADER_BYTES = 16 << 20
MAX_TENSORS = 65536
# The reference refuses longer headers whatever our cap says.
FORMAT_MAX_HEADER_BYTES = 100_000_000

# Element sizes in bits: F4 and F6 pack several elements per byte.
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

_U64_MAX = (1 << 64) - 1
_I32_MAX = (1 << 31) - 1
# serde_json starts with 128 levels and fails when they run out.
_MAX_DEPTH = 127
_SHOWN = 64  # longest piece of client input quoted in a message
_FIELDS = ("dtype", "shape", "data_offsets")
_FIELD_SET = frozenset(_FIELDS)
_METADATA = "__metadata__"


class BadModel(InvalidRequest):
    """A safetensors file that is malformed or hostile."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # Offsets in the file (not relative to the data section); a zero-size
    # tensor has begin == end.
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    data_start: int
    tensors: tuple[TensorEntry, ...]  # in file order; may be empty
    metadata: dict[str, str]


def read_header(
    fd: int, file_size: int, *, max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int = MAX_TENSORS
) -> Header:
    if file_size < 8:
        raise BadModel(f"a safetensors file starts with an 8-byte header length; this file has {file_size} bytes")
    prefix = os.pread(fd, 8, 0)
    if len(prefix) != 8:
        raise BadModel("the file ended inside its header length; was it truncated while loading?")
    length = int.from_bytes(prefix, "little")
    if length > FORMAT_MAX_HEADER_BYTES:
        raise BadModel(f"the header length field says {length} bytes; safetensors allows at most 100000000")
    if length > max_header_bytes:
        raise BadModel(
            f"the header is {length} bytes, more than the {max_header_bytes} this daemon accepts "
            "(loading.max_header_bytes)"
        )
    if 8 + length > file_size:
        raise BadModel(f"the header length field says {length} bytes but only {file_size - 8} follow it")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise BadModel("the file ended inside its header; was it truncated while loading?")
    return parse_header(raw, file_size, max_tensors=max_tensors)


# Brackets a header may have besides three per tensor (its entry's braces,
# its shape, its offsets): the root, __metadata__, and brackets inside
# strings (names, metadata values), which the count below cannot tell from
# structure. Also one per 16 bytes of header, for metadata strings that
# hold JSON or templates.
_BRACKETS_SLACK = 65536


_DATA_OFFSETS_KEY = re.compile(rb'"data_offsets"\s*:')


def _check_brackets(raw: bytes, max_tensors: int) -> None:
    """Refuse a header whose brackets outnumber what its tensors need, before
    parsing it: nested empty arrays cost the JSON parser about 55 bytes of
    memory per byte of header and hold the GIL while it builds them, so a
    16 MiB header of them stalls every client for seconds and takes
    gigabytes. A bytes count costs microseconds."""
    brackets = raw.count(b"[") + raw.count(b"{")
    # Keys only (a string elsewhere does not count), and no more than a
    # header may have tensors.
    tensors = min(len(_DATA_OFFSETS_KEY.findall(raw)), max_tensors)
    allowed = 3 * tensors + _BRACKETS_SLACK + len(raw) // 16
    if brackets > allowed:
        raise BadModel(
            f"the header has {brackets} brackets for at most {tensors} tensors; a safetensors header needs about "
            "three per tensor (nested arrays or objects in its entries are not part of the format)"
        )


def parse_header(raw: bytes, file_size: int, *, max_tensors: int = MAX_TENSORS) -> Header:
    """Validate `raw`, the header's JSON bytes, for a file of `file_size`
    bytes (the 8-byte length, the header, then the data)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadModel(f"the header is not valid UTF-8 (byte {error.start} of the header)") from None
    _check_brackets(raw, max_tensors)
    metadata, entries = _top_level(text, _delicate_numbers(raw), max_tensors)
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    position = 0
    tensors: list[TensorEntry] = []
    # The reference sorts by offsets; names order ties so the result is stable.
    for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2:], item[0])):
        if begin != position or end < begin:
            raise BadModel(f"tensor {quoted(name)}: data_offsets [{begin}, {end}] {_misplaced(begin, end, position)}")
        if end > data_size:
            raise BadModel(
                f"tensor {quoted(name)}: data_offsets [{begin}, {end}] fall outside the {data_size}-byte data section"
            )
        position = end
        nbits = _nbits(name, dtype, shape)
        if end - begin != nbits // 8:
            raise BadModel(
                f"tensor {quoted(name)}: {dtype} of shape {_shape(shape)} needs {nbits // 8} bytes "
                f"but data_offsets [{begin}, {end}] hold {end - begin}"
            )
        tensors.append(TensorEntry(name, dtype, shape, data_start + begin, data_start + end))
    if not tensors and data_size:
        raise BadModel(f"the header has no tensors but {data_size} bytes of data follow it")
    if position != data_size:
        raise BadModel(
            f"the tensors cover {position} bytes of data but the file has {data_size} after the header; "
            "a safetensors file ends where its last tensor ends"
        )
    return Header(data_start, tuple(tensors), metadata)


def _misplaced(begin: int, end: int, position: int) -> str:
    if end < begin:
        return "end before they begin"
    if begin > position:
        return f"leave a gap after byte {position}; tensors must be packed back to back from offset 0"
    return f"overlap the tensor before, which ends at {position}"


def _nbits(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    # The reference multiplies in u64 and fails on the first overflow, even
    # when a later dimension is 0, so the product is checked step by step.
    elements = 1
    for dimension in filter((1).__ne__, shape):  # at most ~64 factors of 2 or more before overflow
        elements *= dimension
        if elements == 0 or elements > _U64_MAX:
            break
    nbits = elements * DTYPE_BITS[dtype]
    if nbits > _U64_MAX:
        raise BadModel(f"tensor {quoted(name)}: shape {_shape(shape)} of {dtype} overflows 64 bits")
    if nbits % 8:
        raise BadModel(
            f"tensor {quoted(name)}: {elements} elements of {dtype} are {nbits} bits, not whole bytes "
            f"({DTYPE_BITS[dtype]}-bit elements come in multiples of {8 // math.gcd(8, DTYPE_BITS[dtype])})"
        )
    return nbits


# -- the JSON, as serde_json reads it ------------------------------------------


class _Object(tuple[tuple[str, object], ...]):
    """A JSON object as its (key, value) pairs: duplicates matter here."""


_WHITESPACE = re.compile(r"[ \t\n\r]*")
# A name without escapes and its colon: the common case, in one match.
_PLAIN_NAME = re.compile(r'[ \t\n\r]*"([^"\\\x00-\x1f]*)"[ \t\n\r]*:[ \t\n\r]*')
_AFTER_VALUE = re.compile(r"[ \t\n\r]*([,}]?)")
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789E", b"000000000e")
_NEGATIVE_ZERO = re.compile(rb"-0(?![.\deE])")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Strings (terminated or not, so that no input makes this backtrack) or runs
# of anything that is neither a string nor a bracket.
_NOT_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[^"\[\]{}]+', re.DOTALL)
_DEPTH_DELTA = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE]([-+]?)(\d+))?")
_POW10 = [float(f"1e{exponent}") for exponent in range(309)]

Scanner = Callable[[str, int], tuple[Any, int]]


def _delicate_numbers(raw: bytes) -> bool:
    """Whether `raw` may hold numbers Python and serde_json read differently:
    20 digits or more (past u64, or Python's int digit limit), exponents of
    100 or more (near the end of the f64 range), -0 (a float to serde_json).
    Headers without them can use the plain, faster int and float parsers."""
    shape = raw.translate(_DIGITS_AS_ZERO)
    return b"0" * 20 in shape or b"e000" in shape or b"e+000" in shape or _NEGATIVE_ZERO.search(raw) is not None


def _top_level(
    text: str, careful: bool, max_tensors: int
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """The metadata and {name: (dtype, shape, begin, end)}. Parsed entry by
    entry so the tensor cap stops the work, not just the result."""
    scan = _scanner(careful)
    surrogates_possible = _SURROGATE_ESCAPE.search(text) is not None
    deep_possible = text.count("[") + text.count("{") >= _MAX_DEPTH
    metadata: dict[str, str] | None = None
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    count = 0
    index = _skip(text, 0)
    if not text.startswith("{", index):
        raise _syntax("expected '{' (a safetensors header is a JSON object)", index)
    index = _skip(text, index + 1)
    closed = text.startswith("}", index)
    if closed:
        index += 1
    while not closed:
        plain = _PLAIN_NAME.match(text, index)
        if plain is not None:
            name, index = plain[1], plain.end()
        else:
            name, index = _name(scan, text, index)
        if name != _METADATA:
            count += 1
            if count > max_tensors:
                raise BadModel(f"the header has more than {max_tensors} tensors (loading.max_tensors)")
        start = index
        value, index = _value(scan, text, index)
        # Nesting past serde_json's limit but within Python's parses; look
        # only where there are enough brackets for it.
        if deep_possible and text.count("[", start, index) + text.count("{", start, index) >= _MAX_DEPTH - 1:
            _check_depth(text[start:index])
        if surrogates_possible:
            _check_surrogates(name, value)
        if name != _METADATA:
            entries[name] = _tensor(name, value)
        elif metadata is not None:
            raise BadModel("the header has two __metadata__ entries")
        else:
            metadata = _metadata(value)
        after = _AFTER_VALUE.match(text, index)
        assert after is not None  # the pattern matches the empty string
        if not after[1]:
            raise _syntax("expected ',' or '}'", after.end())
        index = after.end()
        closed = after[1] == "}"
    if _skip(text, index) != len(text):
        raise _syntax("data after the header's JSON object (only whitespace may pad it)", index)
    return metadata or {}, entries


def _scanner(careful: bool) -> Scanner:
    if careful:
        decoder = json.JSONDecoder(
            object_pairs_hook=_Object, parse_int=_integer, parse_float=_serde_float, parse_constant=_no_constant
        )
    else:
        decoder = json.JSONDecoder(object_pairs_hook=_Object, parse_constant=_no_constant)
    # The C scanner itself: raw_decode() would wrap it in Python per value.
    scanner: Scanner = json.scanner.make_scanner(cast(Any, decoder))
    return scanner


def _name(scan: Scanner, text: str, index: int) -> tuple[str, int]:
    index = _skip(text, index)
    if text.startswith("}", index):
        raise _syntax("trailing comma", index)
    if not text.startswith('"', index):
        raise _syntax("expected a tensor name in double quotes", index)
    name, index = _value(scan, text, index)
    assert isinstance(name, str)  # what the scanner makes of a '"'
    index = _skip(text, index)
    if not text.startswith(":", index):
        raise _syntax("expected ':' after a name", index)
    return name, _skip(text, index + 1)


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def _syntax(what: str, index: int) -> BadModel:
    return BadModel(f"the header is not valid JSON: {what} at character {index}")


def _value(scan: Scanner, text: str, index: int) -> tuple[object, int]:
    try:
        return scan(text, index)
    except StopIteration as stop:
        raise _syntax("expected a value", stop.value) from None
    except json.JSONDecodeError as error:
        raise _syntax(error.msg, error.pos) from None
    except RecursionError:  # deeper than Python goes, so far past serde_json's limit
        raise BadModel(f"the header nests arrays and objects more than {_MAX_DEPTH} deep") from None


def _check_depth(fragment: str) -> None:
    brackets = _NOT_BRACKETS.sub("", fragment).encode("ascii").translate(_DEPTH_DELTA)
    # +1 for the top-level object around every value.
    deepest = 1 + max(itertools.accumulate(map(operator.sub, brackets, itertools.repeat(1))), default=0)
    if deepest > _MAX_DEPTH:
        raise BadModel(f"the header nests arrays and objects {deepest} deep; safetensors allows {_MAX_DEPTH}")


def _check_surrogates(name: str, value: object) -> None:
    # Python decodes a lone \ud800 escape; serde_json refuses it.
    if _SURROGATE.search(json.dumps([name, value], ensure_ascii=False)):
        raise BadModel("the header has a \\u escape of a lone UTF-16 surrogate, which is not a character")


def _no_constant(name: str) -> object:
    raise BadModel(f"the header is not valid JSON: {name} is not a JSON number")


def _integer(literal: str) -> int | float:
    """A JSON integer: an int if it fits a u64 (serde_json's usize), else
    the float serde_json would make of it (so never a shape or offset)."""
    if len(literal) < 20 and literal[0] != "-":
        return int(literal)
    if literal[0] != "-" and len(literal) == 20 and int(literal) <= _U64_MAX:
        return int(literal)
    return _serde_float(literal)


def _serde_float(literal: str) -> float:
    """The f64 serde_json (without float_roundtrip) parses `literal` to, or
    BadModel where it reports "number out of range". Its digit-by-digit
    algorithm is mirrored, not correct rounding: the two differ at the top
    of the range."""
    match = _NUMBER.fullmatch(literal)
    assert match is not None  # the json scanner matched a number
    integer, fraction, exponent_sign, exponent_digits = match.groups()
    negative = literal.startswith("-")
    # Digits accumulate into a u64 until the next would overflow it; the
    # integer digits after that only scale, the fraction digits are dropped.
    significand = int(integer[:19])
    taken = min(len(integer), 19)
    if len(integer) >= 20 and significand * 10 + int(integer[19]) <= _U64_MAX:
        significand, taken = significand * 10 + int(integer[19]), 20
    exponent = len(integer) - taken
    if fraction is not None:
        if significand == 0:
            zeros = len(fraction) - len(fraction.lstrip("0"))
            exponent -= zeros
            fraction = fraction[zeros:]
        for digit in fraction[:21]:
            if significand * 10 + int(digit) > _U64_MAX:
                break
            significand = significand * 10 + int(digit)
            exponent -= 1
    if exponent_digits is not None:
        stripped = exponent_digits.lstrip("0")
        if len(stripped) > 10 or int(stripped or "0") > _I32_MAX:
            if significand != 0 and exponent_sign != "-":
                raise BadModel("the header has a number out of the range of a 64-bit float")
            return -0.0 if negative else 0.0
        scale = int(stripped or "0")
        exponent = max(-_I32_MAX - 1, min(_I32_MAX, exponent - scale if exponent_sign == "-" else exponent + scale))
    value = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            value = value * _POW10[exponent] if exponent >= 0 else value / _POW10[-exponent]
            break
        if value == 0.0:
            break
        if exponent >= 0:
            value = math.inf
            break
        value /= 1e308
        exponent += 308
    if math.isinf(value):
        raise BadModel("the header has a number out of the range of a 64-bit float")
    return -value if negative else value


# -- what the JSON must say ------------------------------------------------------


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, _Object):
        raise BadModel("__metadata__ must be an object mapping strings to strings")
    metadata: dict[str, str] = {}
    for key, item in value:  # a repeated key keeps its last value, as in the reference
        if not isinstance(item, str):
            raise BadModel(f"__metadata__ {quoted(key)}: the value must be a string")
        metadata[key] = item
    return metadata


def _tensor(name: str, value: object) -> tuple[str, tuple[int, ...], int, int]:
    if isinstance(value, _Object):
        fields: dict[str, object] = dict(value)
        if len(value) != 3 or fields.keys() != _FIELD_SET:  # duplicates or unknown fields: count them
            fields = {}
            for key, item in value:
                if key in _FIELD_SET:
                    if key in fields:
                        raise BadModel(f"tensor {quoted(name)}: {key} is given twice")
                    fields[key] = item
        missing = [field for field in _FIELDS if field not in fields]
        if missing:
            raise BadModel(f"tensor {quoted(name)}: missing {', '.join(missing)}")
        dtype, shape, offsets = (fields[field] for field in _FIELDS)
    elif isinstance(value, list) and len(value) == 3:  # serde reads a struct from an array too
        dtype, shape, offsets = value
    else:
        raise BadModel(
            f"tensor {quoted(name)}: must be an object with dtype, shape and data_offsets (or an array of the three)"
        )
    if isinstance(dtype, _Object) and len(dtype) == 1 and dtype[0][1] is None:  # serde's {"F32": null}
        dtype = dtype[0][0]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        shown = quoted(dtype) if isinstance(dtype, str) else "(not a string)"
        raise BadModel(f"tensor {quoted(name)}: dtype {shown} is not a safetensors dtype such as F32, BF16, I64 or F4")
    if not isinstance(shape, list) or not _usizes(shape):
        raise BadModel(f"tensor {quoted(name)}: shape must be a list of integers from 0 to 2**64-1")
    if not isinstance(offsets, list) or len(offsets) != 2 or not _usizes(offsets):
        raise BadModel(f"tensor {quoted(name)}: data_offsets must be [begin, end], integers from 0 to 2**64-1")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _usizes(values: list[Any]) -> bool:
    # bool is an int subclass, hence type() rather than isinstance().
    return not values or (set(map(type, values)) == {int} and min(values) >= 0 and max(values) <= _U64_MAX)


def quoted(text: str) -> str:
    """`text` (client input) quoted for a message, cut so that it stays short."""
    quoted = repr(text[: _SHOWN + 1])
    if len(text) > _SHOWN or len(quoted) > _SHOWN + 2:
        return quoted[:_SHOWN] + "..."
    return quoted


def _shape(shape: tuple[int, ...]) -> str:
    shown = str(list(shape[:_SHOWN]))
    return shown if len(shown) <= _SHOWN and len(shape) <= _SHOWN else shown[: _SHOWN - 4] + "...]"
