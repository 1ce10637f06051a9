from __future__ import annotations

import queue
from pathlib import Path

import pytest

from dmabufd.config import AccessRule, HeapConfig
from dmabufd.errors import AccessDenied, HeapNotFound, InvalidRequest
from dmabufd.heaps.backend import BackendKind, HeapSpec
from dmabufd.heaps.memfd import MEMFD_SPEC
from dmabufd.heaps.registry import Caller, HeapEvent, HeapEventKind, HeapRegistry

ANYONE = Caller(1000, frozenset({1000}))


def heap(name: str) -> HeapSpec:
    return HeapSpec(name, BackendKind.DMA_HEAP, f"/dev/dma_heap/{name}")


def registry_with(*names: str, config: HeapConfig | None = None) -> HeapRegistry:
    registry = HeapRegistry(config or HeapConfig())
    registry.update({name: heap(name) for name in names} | {"memfd": MEMFD_SPEC})
    return registry


def test_usage_routes_pick_the_first_present_heap() -> None:
    registry = registry_with("system", "linux,cma")
    assert registry.resolve("", "camera", ANYONE).spec.name == "linux,cma"
    assert registry.resolve("", "model-weights", ANYONE).spec.name == "system"
    assert registry.resolve("", "", ANYONE).spec.name == "system"
    assert registry_with().resolve("", "camera", ANYONE).spec.name == "memfd"


def test_the_2025_cma_rename_is_an_alias() -> None:
    new_kernel = registry_with("default_cma_region", "linux,cma", "system")
    assert new_kernel.resolve("cma", "", ANYONE).spec.name == "default_cma_region"
    assert new_kernel.aliases_of("default_cma_region") == ["cma"]
    old_kernel = registry_with("linux,cma", "system")
    assert old_kernel.resolve("cma", "", ANYONE).spec.name == "linux,cma"


def test_uncached_alias_falls_back_to_system() -> None:
    assert registry_with("system").resolve("system-uncached", "", ANYONE).spec.name == "system"
    both = registry_with("system", "system-uncached")
    assert both.resolve("system-uncached", "", ANYONE).spec.name == "system-uncached"


def test_errors() -> None:
    registry = registry_with("system")
    with pytest.raises(HeapNotFound, match="present heaps: memfd, system"):
        registry.resolve("vendor", "", ANYONE)
    with pytest.raises(InvalidRequest, match="known usages"):
        registry.resolve("", "nope", ANYONE)


def test_access_rules() -> None:
    config = HeapConfig(access={"linux,cma": AccessRule(frozenset({1047}), frozenset({1006}))})
    registry = registry_with("linux,cma", "system", config=config)
    camera = Caller(1047, frozenset())
    in_group = Caller(2000, frozenset({1006}))
    assert registry.resolve("cma", "", camera).spec.name == "linux,cma"
    assert registry.resolve("", "camera", in_group).spec.name == "linux,cma"
    with pytest.raises(AccessDenied, match="may not allocate from heap 'linux,cma'"):
        registry.resolve("linux,cma", "", ANYONE)
    assert registry.resolve("", "camera", ANYONE).spec.name == "system", "the route skips a denied heap"


def test_update_reports_changes_to_watchers() -> None:
    registry = registry_with("system")
    events: queue.SimpleQueue[HeapEvent | None] = queue.SimpleQueue()
    with registry.watch(events.put) as present:
        assert {spec.name for spec in present} == {"system", "memfd"}
        registry.update({"memfd": MEMFD_SPEC, "linux,cma": heap("linux,cma")})
        got = [events.get_nowait() for _ in range(2)]
    assert [(e.kind, e.spec.name) for e in got if e is not None] == [
        (HeapEventKind.REMOVED, "system"),
        (HeapEventKind.ADDED, "linux,cma"),
    ]
    assert registry.update({"memfd": MEMFD_SPEC, "linux,cma": heap("linux,cma")}) == [], "no change, no event"


def test_same_name_new_device_is_replaced() -> None:
    registry = registry_with("system")
    moved = HeapSpec("system", BackendKind.DMA_HEAP, str(Path("/other/system")))
    events = registry.update({"system": moved, "memfd": MEMFD_SPEC})
    assert [e.kind for e in events] == [HeapEventKind.REMOVED, HeapEventKind.ADDED]
    assert registry.resolve("system", "", ANYONE).spec.device_path == "/other/system"


def test_close_ends_watchers() -> None:
    registry = registry_with()
    events: queue.SimpleQueue[HeapEvent | None] = queue.SimpleQueue()
    with registry.watch(events.put):
        registry.close()
        assert events.get_nowait() is None
