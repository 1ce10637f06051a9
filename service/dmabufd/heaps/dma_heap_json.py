"""Android's /vendor/etc/dma_heap.json: which DMA heaps serve which NPU
buffers.

The file is the protobuf JSON form of AOSP's message DmaHeapsInfo (package
android.os.dma_heap):

    {"devices": {"/dev/dma_heap/system": {"npu": [
        {"device_numbers": [0], "buffer_types": ["MODEL_WEIGHTS", "CACHE"]}]}}}

`devices` maps a heap's device path to a DmaHeapInfo, whose repeated `npu`
holds NpuCompatibility entries: the NPUs (numbered from 0) and the
BufferType values (by name or number) the heap serves. Android's NPU
manager reads it with rust-protobuf's JSON parser (protobuf_json_mapping::
parse_from_str, default options: an unknown field is an error) and looks a
heap up by NPU number and buffer type, taking the first match. This reader
accepts the same spellings (lowerCamelCase or the proto's snake_case
field names, null for an empty list or map, integers also as decimal
strings) and differs on purpose where the daemon must neither die of a
newer Android's file nor serve a broken one:

- a buffer type this daemon does not know, by name or number, is dropped
  with a warning (AOSP refuses an unknown name, and keeps an unknown number,
  which then matches no request);
- a device path outside /dev/dma_heap/ is refused (AOSP skips it at lookup);
- a negative NPU number is refused (AOSP's lookup takes it as an int32,
  which no NPU matches);
- a key given twice is refused (AOSP's parser keeps the last).

Every error names the key path it is about, e.g.
devices["/dev/dma_heap/system"].npu[0].device_numbers[1]. Nothing here
imports the daemon: the module is the file format and nothing else.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmabufd_common import npu

DEFAULT_PATH = Path("/vendor/etc/dma_heap.json")
HEAP_DIR = "/dev/dma_heap/"
# A vendor file of a few heaps is a few KiB; the cap only bounds what a
# mistaken path (a log, a device) could make the daemon read.
MAX_FILE_BYTES = 1 << 20
# AOSP's NPU manager takes an NPU's number as a Java int.
MAX_DEVICE_NUMBER = (1 << 31) - 1

# Each message's fields: proto name -> lowerCamelCase JSON name.
_FIELDS: dict[str, dict[str, str]] = {
    "DmaHeapsInfo": {"devices": "devices"},
    "DmaHeapInfo": {"npu": "npu"},
    "NpuCompatibility": {"device_numbers": "deviceNumbers", "buffer_types": "bufferTypes"},
}


class DmaHeapJsonError(ValueError):
    """The file is malformed; the message names the key path."""


@dataclass(frozen=True)
class NpuCompatibility:
    device_numbers: tuple[int, ...]
    # BufferType numbers this daemon knows; unknown ones were dropped.
    buffer_types: tuple[int, ...]


@dataclass(frozen=True)
class DmaHeapsInfo:
    # Device path -> its entries, in the file's order.
    devices: dict[str, tuple[NpuCompatibility, ...]]
    # What was dropped or will not route, each naming its key path.
    warnings: tuple[str, ...] = ()

    def routes(self) -> dict[tuple[int, int], tuple[str, ...]]:
        """(buffer type, NPU) -> heap names in the file's order. AOSP's
        reader keeps devices in a hash map, so it takes any one of several
        heaps listed for the same pair; here they are tried in file order."""
        found: dict[tuple[int, int], list[str]] = {}
        for path, entries in self.devices.items():
            for entry in entries:
                for kind in entry.buffer_types:
                    for device in entry.device_numbers:
                        names = found.setdefault((kind, device), [])
                        if heap_name(path) not in names:
                            names.append(heap_name(path))
        return {pair: tuple(names) for pair, names in sorted(found.items())}

    def heap_names(self) -> list[str]:
        return [heap_name(path) for path in self.devices]


def heap_name(device_path: str) -> str:
    """The heap a device path names: /dev/dma_heap/<name>, as AOSP strips it."""
    return device_path.removeprefix(HEAP_DIR)


def _quoted(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def _member(where: str, key: str) -> str:
    """The key path of field `key` of the object at `where`."""
    if not key.isidentifier():
        return f"{where}[{_quoted(key)}]"
    return f"{where}.{key}" if where else key


class _Reader:
    """Walks the parsed JSON; `where` is the key path of the value at hand."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    @staticmethod
    def fail(where: str, problem: str) -> DmaHeapJsonError:
        return DmaHeapJsonError(f"{where}: {problem}" if where else problem)

    def message(self, value: Any, kind: str, where: str) -> dict[str, tuple[str, Any]]:
        """An object's fields by proto name: (the key as written, its value).
        null fields are absent, as protobuf JSON has them."""
        if not isinstance(value, _Object):
            raise self.fail(where, f"expected an object ({kind}), not {_describe(value)}")
        fields = _FIELDS[kind]
        by_json_name = {json_name: name for name, json_name in fields.items()}
        found: dict[str, tuple[str, Any]] = {}
        for key, item in value.pairs:
            name = key if key in fields else by_json_name.get(key)
            inside = _member(where, key)
            if name is None:
                known = ", ".join(sorted(set(fields) | set(by_json_name)))
                raise self.fail(inside, f"unknown field of {kind} (known: {known})")
            if name in found:
                raise self.fail(inside, f"given twice (also as {found[name][0]!r})")
            found[name] = (key, item)
        return {name: found[name] for name in found if found[name][1] is not None}

    def array(self, value: Any, where: str, what: str) -> Iterator[tuple[str, Any]]:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list of {what}, not {_describe(value)}")
        for index, item in enumerate(value):
            yield f"{where}[{index}]", item

    def device_number(self, value: Any, where: str) -> int:
        # protobuf JSON takes integers as numbers or as decimal strings.
        number = value
        if isinstance(value, str) and value.isascii() and value.removeprefix("-").isdigit():
            number = int(value)
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_DEVICE_NUMBER:
            raise self.fail(where, f"expected a non-negative integer (at most {MAX_DEVICE_NUMBER}), not {value!r}")
        return number

    def buffer_type(self, value: Any, where: str) -> int | None:
        """A BufferType by name or number; None (with a warning) when this
        daemon does not know it."""
        if isinstance(value, str):
            number = npu.ANDROID_NAMES.get(value)
            shown = _quoted(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value if value in npu.ANDROID_NAMES.values() else None
            shown = str(value)
        else:
            raise self.fail(where, f"expected a BufferType name or number, not {_describe(value)}")
        if number is None:
            known = ", ".join(f"{name} ({number})" for name, number in npu.ANDROID_NAMES.items())
            self.warnings.append(f"{where}: unknown buffer type {shown} ignored (known: {known})")
            return None
        if number == npu.UNSPECIFIED:
            self.warnings.append(
                f"{where}: {npu.ANDROID_ZERO_NAME} routes nothing in dmabufd "
                "(a request without a buffer type routes by its usage)"
            )
        return number

    def device_path(self, path: str, where: str) -> str:
        name = heap_name(path)
        if not path.startswith(HEAP_DIR) or not name or "/" in name or name in (".", ".."):
            raise self.fail(where, f"expected a heap's device path, {HEAP_DIR}<name>")
        return path

    def read(self, document: Any) -> DmaHeapsInfo:
        top = self.message(document, "DmaHeapsInfo", "")
        devices: dict[str, tuple[NpuCompatibility, ...]] = {}
        if "devices" in top:
            key, table = top["devices"]
            if not isinstance(table, _Object):
                raise self.fail(key, f"expected an object mapping device paths to DmaHeapInfo, not {_describe(table)}")
            for path, info in table.pairs:
                where = f"{key}[{_quoted(path)}]"
                if path in devices:
                    raise self.fail(where, "given twice")
                self.device_path(path, where)
                if info is None:
                    raise self.fail(where, "expected an object (DmaHeapInfo), not null")
                devices[path] = self.heap_info(info, where)
        return DmaHeapsInfo(devices, tuple(self.warnings))

    def heap_info(self, value: Any, where: str) -> tuple[NpuCompatibility, ...]:
        fields = self.message(value, "DmaHeapInfo", where)
        if "npu" not in fields:
            return ()
        key, entries = fields["npu"]
        return tuple(self.entry(item, inside) for inside, item in self.array(entries, f"{where}.{key}", "objects"))

    def entry(self, value: Any, where: str) -> NpuCompatibility:
        fields = self.message(value, "NpuCompatibility", where)
        numbers: list[int] = []
        kinds: list[int] = []
        if "device_numbers" in fields:
            key, items = fields["device_numbers"]
            for inside, item in self.array(items, f"{where}.{key}", "NPU numbers"):
                number = self.device_number(item, inside)
                if number not in numbers:
                    numbers.append(number)
        if "buffer_types" in fields:
            key, items = fields["buffer_types"]
            for inside, item in self.array(items, f"{where}.{key}", "BufferType names or numbers"):
                kind = self.buffer_type(item, inside)
                if kind is not None and kind not in kinds:
                    kinds.append(kind)
        return NpuCompatibility(tuple(numbers), tuple(kinds))


class _Object:
    """A JSON object as written: its pairs in order, duplicates kept (a
    dict would silently keep the last)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, _Object):
        return "an object"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {_quoted(value[:40])}"
    if isinstance(value, list):
        return "a list"
    return f"the number {value!r}"


def _no_constant(name: str) -> Any:
    raise DmaHeapJsonError(f"{name} is not JSON")


def parse(text: str | bytes) -> DmaHeapsInfo:
    """Parse a dma_heap.json document. Raises DmaHeapJsonError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DmaHeapJsonError(f"not UTF-8 text (byte {error.start})") from None
    try:
        document = json.loads(text, object_pairs_hook=_Object, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise DmaHeapJsonError(f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise DmaHeapJsonError("not valid JSON: nested too deeply") from None
    return _Reader().read(document)


def load(path: Path) -> DmaHeapsInfo:
    """Read and parse the file at `path`. Raises FileNotFoundError when it
    does not exist (the caller decides whether that matters), and
    DmaHeapJsonError for anything else, naming the file."""
    try:
        # O_NONBLOCK: a FIFO at the path must not hang start-up.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise
    except OSError as error:
        raise DmaHeapJsonError(f"{path}: cannot read it: {error.strerror}") from None
    chunks: list[bytes] = []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DmaHeapJsonError(f"{path}: not a regular file")
        size = 0
        while size <= MAX_FILE_BYTES and (chunk := os.read(fd, MAX_FILE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise DmaHeapJsonError(f"{path}: cannot read it: {error.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        raise DmaHeapJsonError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return parse(data)
    except DmaHeapJsonError as error:
        raise DmaHeapJsonError(f"{path}: {error}") from None
