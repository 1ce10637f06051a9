"""Android's dma_heap.json: the reader (every malformed input refused with
its key path, unknown buffer types dropped with a warning), the config key
that finds it, the routes it adds to the registry, and how a request's NPU
fields become its route."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from dmabufd import config as config_module
from dmabufd.api.routing import route_of
from dmabufd.config import AccessRule, HeapConfig, parse_config
from dmabufd.errors import AccessDenied, ConfigError, HeapNotFound, InvalidRequest
from dmabufd.heaps import dma_heap_json
from dmabufd.heaps.backend import BackendKind, HeapSpec
from dmabufd.heaps.dma_heap_json import DmaHeapJsonError, DmaHeapsInfo, NpuCompatibility, parse
from dmabufd.heaps.memfd import MEMFD_SPEC
from dmabufd.heaps.registry import Caller, HeapRegistry, NpuRoute
from dmabufd_common import npu
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dma_heap.json"
SYSTEM = '"/dev/dma_heap/system"'
ANYONE = Caller(1000, frozenset({1000}))
WEIGHTS = pb.NPU_BUFFER_TYPE_MODEL_WEIGHTS
CACHE = pb.NPU_BUFFER_TYPE_CACHE


def document(*entries: dict[str, Any], path: str = "/dev/dma_heap/system") -> str:
    return json.dumps({"devices": {path: {"npu": list(entries)}}})


# -- the enum, one fact in one place -------------------------------------------


def test_buffer_types_are_aosps() -> None:
    """AOSP's BufferType (android.os.dma_heap; the NDK's ANpuBuffer_Type
    has the same order): the names dma_heap.json uses, with their numbers."""
    assert npu.ANDROID_NAMES == {
        "UNKNOWN": 0,
        "MODEL_EXECUTABLE": 1,
        "MODEL_WEIGHTS": 2,
        "CACHE": 3,
        "AUXILIARY": 4,
    }


def test_every_buffer_type_routes_as_one_known_usage() -> None:
    assert set(npu.USAGES) == {number for _, number in pb.NpuBufferType.items()} - {npu.UNSPECIFIED}
    assert len(set(npu.USAGES.values())) == len(npu.USAGES)
    assert set(npu.USAGES.values()) <= set(HeapConfig().usage), "each usage has a route of its own to fall back to"


@pytest.mark.parametrize("given", ["MODEL_WEIGHTS", "model_weights", "NPU_BUFFER_TYPE_MODEL_WEIGHTS", 2])
def test_buffer_type_spellings(given: str | int) -> None:
    assert npu.buffer_type(given) == WEIGHTS


@pytest.mark.parametrize("given", ["UNKNOWN", 0, "WEIGHTS", 9, "model-weights"])
def test_buffer_type_refuses_what_routes_nothing(given: str | int) -> None:
    with pytest.raises(ValueError, match="known: MODEL_EXECUTABLE, MODEL_WEIGHTS, CACHE, AUXILIARY"):
        npu.buffer_type(given)


# -- valid files ---------------------------------------------------------------


def test_the_shipped_sample() -> None:
    info = dma_heap_json.load(SAMPLE)
    assert info.warnings == ()
    assert info.heap_names() == ["system", "linux,cma"]
    all_four = (1, 2, 3, 4)
    assert info.devices["/dev/dma_heap/system"] == (NpuCompatibility((0,), all_four),)
    assert info.routes() == {
        (1, 0): ("system",),
        (2, 0): ("system",),
        (2, 1): ("linux,cma",),
        (3, 0): ("system",),
        (4, 0): ("system",),
    }


def test_camel_case_and_snake_case_field_names() -> None:
    snake = parse(document({"device_numbers": [0, 2], "buffer_types": ["CACHE"]}))
    camel = parse(document({"deviceNumbers": [0, 2], "bufferTypes": ["CACHE"]}))
    assert snake == camel
    assert snake.routes() == {(CACHE, 0): ("system",), (CACHE, 2): ("system",)}


def test_enums_by_number_and_integers_as_strings() -> None:
    """protobuf JSON takes an enum by name or number, and an integer as a
    number or a decimal string."""
    info = parse(document({"device_numbers": ["1", 3], "buffer_types": [2, "CACHE", 2]}))
    assert info.devices["/dev/dma_heap/system"] == (NpuCompatibility((1, 3), (WEIGHTS, CACHE)),)
    assert info.warnings == ()


def test_nulls_and_missing_fields_are_empty() -> None:
    assert parse("{}") == DmaHeapsInfo({})
    assert parse('{"devices": null}') == DmaHeapsInfo({})
    info = parse('{"devices": {"/dev/dma_heap/a": {}, "/dev/dma_heap/b": {"npu": null}}}')
    assert info.devices == {"/dev/dma_heap/a": (), "/dev/dma_heap/b": ()}
    entry = parse(document({"device_numbers": None, "buffer_types": [1]}))
    assert entry.devices["/dev/dma_heap/system"] == (NpuCompatibility((), (1,)),)
    assert entry.routes() == {}, "a type for no NPU routes nothing"


def test_unknown_buffer_types_are_dropped_with_a_warning() -> None:
    """A newer Android's type (or a typo) costs its own entry, not the
    daemon: AOSP's reader refuses the whole file on an unknown name."""
    info = parse(document({"device_numbers": [0], "buffer_types": ["MODEL_WEIGHTS", "MODEL_BIAS", 7, "cache"]}))
    assert info.devices["/dev/dma_heap/system"] == (NpuCompatibility((0,), (WEIGHTS,)),)
    where = f"devices[{SYSTEM}].npu[0].buffer_types"
    assert len(info.warnings) == 3
    assert info.warnings[0].startswith(f'{where}[1]: unknown buffer type "MODEL_BIAS" ignored (known: UNKNOWN (0), ')
    assert info.warnings[1].startswith(f"{where}[2]: unknown buffer type 7 ignored")
    assert info.warnings[2].startswith(f'{where}[3]: unknown buffer type "cache" ignored'), "names are case-sensitive"


def test_unknown_is_kept_but_warned_about() -> None:
    info = parse(document({"device_numbers": [0], "buffer_types": ["UNKNOWN"]}))
    assert info.routes() == {(0, 0): ("system",)}
    (warning,) = info.warnings
    assert warning.startswith(f"devices[{SYSTEM}].npu[0].buffer_types[0]: UNKNOWN routes nothing in dmabufd")


def test_several_heaps_for_one_pair_keep_the_files_order() -> None:
    text = json.dumps(
        {
            "devices": {
                "/dev/dma_heap/b": {"npu": [{"device_numbers": [0], "buffer_types": ["CACHE"]}]},
                "/dev/dma_heap/a": {"npu": [{"device_numbers": [0], "buffer_types": ["CACHE", "CACHE"]}]},
            }
        }
    )
    assert parse(text).routes() == {(CACHE, 0): ("b", "a")}


# -- malformed files: refused, naming the key path -----------------------------

MALFORMED: list[tuple[str, str]] = [
    ("", "not valid JSON: Expecting value at line 1 column 1"),
    ('{"devices": {}', "not valid JSON: Expecting ',' delimiter at line 1 column 15"),
    ("[]", "expected an object (DmaHeapsInfo), not a list"),
    ('{"device": {}}', "device: unknown field of DmaHeapsInfo (known: devices)"),
    ('{"devices": {}, "devices": {}}', "devices: given twice (also as 'devices')"),
    ('{"devices": []}', "devices: expected an object mapping device paths to DmaHeapInfo, not a list"),
    ('{"devices": {"/dev/foo": {}}}', 'devices["/dev/foo"]: expected a heap\'s device path, /dev/dma_heap/<name>'),
    ('{"devices": {"/dev/dma_heap/": {}}}', 'devices["/dev/dma_heap/"]: expected a heap\'s device path'),
    ('{"devices": {"/dev/dma_heap/a/b": {}}}', 'devices["/dev/dma_heap/a/b"]: expected a heap\'s device path'),
    ('{"devices": {"/dev/dma_heap/..": {}}}', 'devices["/dev/dma_heap/.."]: expected a heap\'s device path'),
    ('{"devices": {"dma_heap/system": {}}}', 'devices["dma_heap/system"]: expected a heap\'s device path'),
    ('{"devices": {"/dev/dma_heap/a": {}, "/dev/dma_heap/a": {}}}', 'devices["/dev/dma_heap/a"]: given twice'),
    (
        '{"devices": {"/dev/dma_heap/a": null}}',
        'devices["/dev/dma_heap/a"]: expected an object (DmaHeapInfo), not null',
    ),
    (
        '{"devices": {"/dev/dma_heap/a": 1}}',
        'devices["/dev/dma_heap/a"]: expected an object (DmaHeapInfo), not the number',
    ),
    (
        '{"devices": {"/dev/dma_heap/a": {"heaps": []}}}',
        'devices["/dev/dma_heap/a"].heaps: unknown field of DmaHeapInfo (known: npu)',
    ),
    ('{"devices": {"/dev/dma_heap/a": {"npu": {}}}}', 'devices["/dev/dma_heap/a"].npu: expected a list of objects'),
    (
        '{"devices": {"/dev/dma_heap/a": {"npu": ["x"]}}}',
        'devices["/dev/dma_heap/a"].npu[0]: expected an object (NpuCompatibility), not the string "x"',
    ),
    (
        document({"device_numbers": [0], "priority": 1}),
        f"devices[{SYSTEM}].npu[0].priority: unknown field of NpuCompatibility "
        "(known: bufferTypes, buffer_types, deviceNumbers, device_numbers)",
    ),
    (
        document({"device_numbers": [0], "deviceNumbers": [1]}),
        f"devices[{SYSTEM}].npu[0].deviceNumbers: given twice (also as 'device_numbers')",
    ),
    (document({"device_numbers": 0}), f"devices[{SYSTEM}].npu[0].device_numbers: expected a list of NPU numbers"),
    (
        document({"device_numbers": [0, -1]}),
        f"devices[{SYSTEM}].npu[0].device_numbers[1]: expected a non-negative integer",
    ),
    (document({"deviceNumbers": ["-1"]}), f"devices[{SYSTEM}].npu[0].deviceNumbers[0]: expected a non-negative"),
    (document({"device_numbers": [1.5]}), f"devices[{SYSTEM}].npu[0].device_numbers[0]: expected a non-negative"),
    (document({"device_numbers": [1.0]}), f"devices[{SYSTEM}].npu[0].device_numbers[0]: expected a non-negative"),
    (document({"device_numbers": [True]}), f"devices[{SYSTEM}].npu[0].device_numbers[0]: expected a non-negative"),
    (document({"device_numbers": [None]}), f"devices[{SYSTEM}].npu[0].device_numbers[0]: expected a non-negative"),
    (document({"device_numbers": ["one"]}), f"devices[{SYSTEM}].npu[0].device_numbers[0]: expected a non-negative"),
    (document({"device_numbers": [2**31]}), f"devices[{SYSTEM}].npu[0].device_numbers[0]: expected a non-negative"),
    (document({"buffer_types": "CACHE"}), f"devices[{SYSTEM}].npu[0].buffer_types: expected a list of BufferType"),
    (
        document({"buffer_types": ["CACHE", {}]}),
        f"devices[{SYSTEM}].npu[0].buffer_types[1]: expected a BufferType name or number, not an object",
    ),
    (
        document({"bufferTypes": [2.0]}),
        f"devices[{SYSTEM}].npu[0].bufferTypes[0]: expected a BufferType name or number, not the number 2.0",
    ),
    (
        document({"bufferTypes": [False]}),
        f"devices[{SYSTEM}].npu[0].bufferTypes[0]: expected a BufferType name or number, not false",
    ),
    ('{"devices": {"/dev/dma_heap/a": {"npu": [{"device_numbers": [NaN]}]}}}', "NaN is not JSON"),
    ('{"a b": 1}', '["a b"]: unknown field of DmaHeapsInfo'),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED, ids=[message[:60] for _, message in MALFORMED])
def test_malformed_is_refused_naming_the_key_path(text: str, message: str) -> None:
    with pytest.raises(DmaHeapJsonError) as caught:
        parse(text)
    assert str(caught.value).startswith(message), str(caught.value)


def test_not_utf8() -> None:
    with pytest.raises(DmaHeapJsonError, match=r"not UTF-8 text \(byte 14\)"):
        parse(b'{"devices": {"\xff": {}}}')


def test_deep_nesting_is_refused_not_a_crash() -> None:
    with pytest.raises(DmaHeapJsonError, match="not valid JSON"):
        parse("[" * 100_000)


# -- reading the file ------------------------------------------------------------


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dma_heap.json"
    path.write_text(document({"device_numbers": [-1]}))
    with pytest.raises(DmaHeapJsonError, match=re.escape(f"{path}: devices[{SYSTEM}].npu[0].device_numbers[0]: ")):
        dma_heap_json.load(path)


def test_load_caps_the_size(tmp_path: Path) -> None:
    path = tmp_path / "dma_heap.json"
    path.write_text(" " * dma_heap_json.MAX_FILE_BYTES + "{}")
    with pytest.raises(DmaHeapJsonError, match="larger than 1048576 bytes"):
        dma_heap_json.load(path)
    path.write_text(" " * (dma_heap_json.MAX_FILE_BYTES - 2) + "{}")
    assert dma_heap_json.load(path) == DmaHeapsInfo({})


def test_load_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(DmaHeapJsonError, match="not a regular file"):
        dma_heap_json.load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(DmaHeapJsonError, match="not a regular file"):
        dma_heap_json.load(fifo)  # and does not block waiting for a writer


def test_load_of_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        dma_heap_json.load(tmp_path / "missing.json")


# -- the config key --------------------------------------------------------------


def heaps_config(tmp_path: Path, value: str | None, monkeypatch: pytest.MonkeyPatch) -> HeapConfig:
    """The heaps config for `heaps.dma_heap_json = value` (None: key absent,
    with the default path pointed into tmp_path)."""
    monkeypatch.setattr(dma_heap_json, "DEFAULT_PATH", tmp_path / "vendor" / "dma_heap.json")
    data: dict[str, Any] = {} if value is None else {"heaps": {"dma_heap_json": value}}
    return parse_config(data).heaps


def test_config_default_path_absent_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    heaps = heaps_config(tmp_path, None, monkeypatch)
    assert (heaps.dma_heap_json, heaps.npu) == (None, None)


def test_config_default_path_present_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "dma_heap.json").write_text(SAMPLE.read_text())
    heaps = heaps_config(tmp_path, None, monkeypatch)
    assert heaps.dma_heap_json == tmp_path / "vendor" / "dma_heap.json"
    assert heaps.npu == dma_heap_json.load(SAMPLE)


def test_config_named_path_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match=re.escape(f"heaps.dma_heap_json: {missing} does not exist")):
        heaps_config(tmp_path, str(missing), monkeypatch)
    assert heaps_config(tmp_path, str(SAMPLE), monkeypatch).npu == dma_heap_json.load(SAMPLE)


def test_config_empty_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "dma_heap.json").write_text("not JSON at all")
    heaps = heaps_config(tmp_path, "", monkeypatch)
    assert (heaps.dma_heap_json, heaps.npu) == (None, None)


def test_config_relative_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=re.escape("heaps.dma_heap_json: 'dma_heap.json' is not an absolute path")):
        heaps_config(tmp_path, "dma_heap.json", monkeypatch)


def test_config_malformed_file_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also at the default path: a vendor file that is there must be right."""
    (tmp_path / "vendor").mkdir()
    path = tmp_path / "vendor" / "dma_heap.json"
    path.write_text(document({"device_numbers": [0, -1]}))
    expected = f"heaps.dma_heap_json: {path}: devices[{SYSTEM}].npu[0].device_numbers[1]: expected a non-negative"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        heaps_config(tmp_path, None, monkeypatch)


def test_config_logs_the_files_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dma_heap.json"
    path.write_text(
        json.dumps(
            {
                "devices": {
                    "/dev/dma_heap/a": {"npu": [{"device_numbers": [0], "buffer_types": ["CACHE", "FUTURE"]}]},
                    "/dev/dma_heap/b": {"npu": [{"device_numbers": [0], "buffer_types": ["CACHE"]}]},
                }
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger=config_module.__name__):
        heaps_config(tmp_path, str(path), monkeypatch)
    messages = [record.getMessage() for record in caplog.records]
    assert any('buffer_types[1]: unknown buffer type "FUTURE" ignored' in m for m in messages), messages
    assert any("CACHE for NPU 0 is listed for several heaps (a, b)" in m for m in messages), messages


# -- routing -------------------------------------------------------------------


def registry(text: str, *present: str, **overrides: Any) -> HeapRegistry:
    config = HeapConfig(npu=parse(text), dma_heap_json=Path("/vendor/etc/dma_heap.json"), **overrides)
    heaps = HeapRegistry(config)
    heaps.update(
        {name: HeapSpec(name, BackendKind.DMA_HEAP, f"/dev/dma_heap/{name}") for name in present}
        | {"memfd": MEMFD_SPEC}
    )
    return heaps


def names(heaps: HeapRegistry, usage: str, npu_device: int | None = None, caller: Caller = ANYONE) -> list[str]:
    return [backend.spec.name for backend in heaps.eligible("", usage, caller, npu_device)]


SAMPLE_TEXT = SAMPLE.read_text()


def test_the_file_routes_before_the_usage_route() -> None:
    heaps = registry(SAMPLE_TEXT, "system", "linux,cma", "udmabuf")
    assert names(heaps, "model-weights") == ["system", "linux,cma"], "NPU 0's heap first, then NPU 1's"
    assert names(heaps, "model-weights", 0) == ["system"]
    assert names(heaps, "model-weights", 1) == ["linux,cma"]
    assert names(heaps, "npu-cache", 0) == ["system"]
    assert names(heaps, "camera") == ["linux,cma", "system", "udmabuf", "memfd"], "other usages are untouched"


def test_an_npu_the_file_does_not_list_takes_the_usage_route() -> None:
    heaps = registry(SAMPLE_TEXT, "system", "linux,cma")
    assert names(heaps, "npu-cache", 1) == ["system", "memfd"]
    assert names(heaps, "model-weights", 7) == ["system", "memfd"]


def test_absent_heaps_are_skipped_then_the_usage_route_applies() -> None:
    heaps = registry(SAMPLE_TEXT, "linux,cma")
    assert names(heaps, "model-weights") == ["linux,cma"]
    assert names(heaps, "model-weights", 0) == ["memfd"], "system is absent: model-weights' own route"
    assert names(registry(SAMPLE_TEXT), "model-weights", 1) == ["memfd"]


def test_heap_names_resolve_through_aliases() -> None:
    text = document({"device_numbers": [0], "buffer_types": ["MODEL_WEIGHTS"]}, path="/dev/dma_heap/npu-weights")
    heaps = registry(text, "system", aliases={"npu-weights": ("vendor,npu", "memfd")})
    assert names(heaps, "model-weights", 0) == ["memfd"]


def test_a_denied_heap_falls_back_like_any_route_entry() -> None:
    rule = {"linux,cma": AccessRule(frozenset({1047}), frozenset())}
    heaps = registry(SAMPLE_TEXT, "system", "linux,cma", access=rule)
    assert names(heaps, "model-weights", 1) == ["system", "memfd"]
    assert names(heaps, "model-weights", 1, Caller(1047, frozenset())) == ["linux,cma"]
    strict = registry(SAMPLE_TEXT, "linux,cma", access=rule, usage={"model-weights": ("linux,cma",)})
    with pytest.raises(AccessDenied, match=r"usage 'model-weights': uid 1000 may not use any present heap .*linux,cma"):
        strict.resolve("", "model-weights", ANYONE, 1)


def test_nothing_present_names_both_routes() -> None:
    heaps = registry(SAMPLE_TEXT, usage={"model-weights": ("udmabuf",)})
    expected = "none of its heaps is present (dma_heap.json: linux,cma; route: udmabuf)"
    with pytest.raises(HeapNotFound, match=re.escape(expected)):
        heaps.resolve("", "model-weights", ANYONE, 1)


def test_a_named_heap_ignores_the_file() -> None:
    heaps = registry(SAMPLE_TEXT, "system", "linux,cma")
    assert heaps.resolve("memfd", "model-weights", ANYONE, 1).spec.name == "memfd"


def test_npu_routes_for_listing() -> None:
    text = document({"device_numbers": [0], "buffer_types": ["UNKNOWN", "AUXILIARY"]})
    assert registry(text).npu_routes() == [NpuRoute(4, 0, "npu-auxiliary", ("system",))], "UNKNOWN routes nothing"
    assert HeapRegistry(HeapConfig()).npu_routes() == []


def test_absent_heaps_are_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dmabufd.heaps.registry"):
        heaps = registry(SAMPLE_TEXT, "system")
        heaps.update({"memfd": MEMFD_SPEC})
    warnings = [record.getMessage() for record in caplog.records if "names heap(s) not present" in record.getMessage()]
    assert warnings == [
        "/vendor/etc/dma_heap.json names heap(s) not present here: linux,cma; NPU buffer types skip them while "
        "they are absent (and take their usage's route when none of theirs is present)"
    ]


# -- a request's NPU fields ------------------------------------------------------


def test_route_of_a_request() -> None:
    assert route_of(pb.AllocateRequest()) == ("", None)
    assert route_of(pb.AllocateRequest(usage="camera")) == ("camera", None)
    assert route_of(pb.LoadModelRequest(), default_usage="model-weights") == ("model-weights", None)
    assert route_of(pb.AllocateRequest(npu_buffer_type=CACHE, npu_device=0)) == ("npu-cache", 0)
    assert route_of(pb.LoadFileRequest(usage="model-weights", npu_buffer_type=WEIGHTS)) == ("model-weights", None)
    assert route_of(pb.LoadFileRequest(usage="npu-auxiliary", npu_device=3)) == ("npu-auxiliary", 3)


def test_route_of_refuses_contradictions() -> None:
    with pytest.raises(InvalidRequest, match="usage 'camera' contradicts npu_buffer_type MODEL_WEIGHTS"):
        route_of(pb.AllocateRequest(usage="camera", npu_buffer_type=WEIGHTS))
    with pytest.raises(InvalidRequest, match="unknown npu_buffer_type 9; known: MODEL_EXECUTABLE"):
        route_of(pb.AllocateRequest(npu_buffer_type=pb.NpuBufferType.ValueType(9)))
    with pytest.raises(
        InvalidRequest, match=r"npu_device needs an NPU buffer type or its usage .* not usage 'default'"
    ):
        route_of(pb.AllocateRequest(npu_device=0))
    with pytest.raises(InvalidRequest, match="not usage 'camera'"):
        route_of(pb.LoadFileRequest(usage="camera", npu_device=1))
