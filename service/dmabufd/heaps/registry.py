"""The live set of heaps, and how a request picks one.

Discovery reports the heap set; update() diffs it against what is known,
opens backends for new heaps, closes those of vanished ones, and tells
watchers. A request names a heap (or an alias), or a usage whose route lists
heaps in preference order; resolve() returns the first one that is present
and that the caller may use.

The usage of an NPU buffer type (model-weights, ...) is routed first by
Android's dma_heap.json, when the daemon read one: the heaps it lists for
the type (for the request's NPU, or for any NPU, NPU 0's first), and only
those while one of them is present and allowed, so that a load's ranking
by speed never trades a heap the NPU needs for a faster one it may not
import. Otherwise the usage's own route applies, as it does everywhere
without the file.

Locking: _lock guards _backends and _watchers. Backends are used outside it
(allocations run concurrently); a backend closed by update() while a call
uses it fails that call with HeapUnavailable, not a crash.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dmabufd.config import HeapConfig
from dmabufd.errors import AccessDenied, HeapNotFound, InvalidRequest
from dmabufd.heaps.backend import BackendKind, HeapBackend, HeapSpec
from dmabufd.heaps.dmaheap import DmaHeapBackend
from dmabufd.heaps.memfd import MemfdBackend
from dmabufd.heaps.reserve import MemfdReserve
from dmabufd.heaps.udmabuf import UdmabufBackend
from dmabufd.loading.method import Method
from dmabufd_common import npu

log = logging.getLogger(__name__)

DEFAULT_USAGE = "default"
_DEVICE_BACKENDS: dict[BackendKind, type[HeapBackend]] = {
    BackendKind.DMA_HEAP: DmaHeapBackend,
    BackendKind.UDMABUF: UdmabufBackend,
}


class HeapEventKind(Enum):
    ADDED = 1
    REMOVED = 2


@dataclass(frozen=True)
class HeapEvent:
    kind: HeapEventKind
    spec: HeapSpec


@dataclass(frozen=True)
class NpuRoute:
    """Where dma_heap.json sends one buffer type for one NPU."""

    buffer_type: int
    npu_device: int
    usage: str
    heap_order: tuple[str, ...]


@dataclass(frozen=True)
class Caller:
    """The credentials access rules are checked against."""

    uid: int
    gids: frozenset[int]


Probe = Callable[[HeapBackend], tuple[Method, ...]]
# eligible()'s memo starts over past this many (request, caller) pairs.
ELIGIBLE_MEMO_ENTRIES = 256
EventSink = Callable[["HeapEvent | None"], None]


class HeapRegistry:
    def __init__(self, config: HeapConfig, probe: Probe | None = None, reserve: MemfdReserve | None = None) -> None:
        """`probe` says which load methods work into a new heap's buffers;
        the memfd heap takes prepared memfds from `reserve` (the daemon's,
        which outlives the registry's backends)."""
        self._config = config
        self._probe = probe
        self._reserve = reserve
        self._lock = threading.Lock()
        self._backends: dict[str, HeapBackend] = {}
        self._watchers: set[EventSink] = set()
        # Guarded by _lock: eligible()'s answers since the heaps last changed
        # (everything else it reads is config), and which change that was.
        # Every allocation asks; the answer depends on a few strings and
        # the caller, so a few entries serve every client.
        self._eligible_memo: dict[tuple[str, str, Caller, int | None], tuple[HeapBackend, ...]] = {}
        self._generation = 0
        routes = config.npu.routes() if config.npu is not None else {}
        self._npu_routes = [
            NpuRoute(kind, device, npu.USAGES[kind], heaps)
            for (kind, device), heaps in routes.items()
            if kind in npu.USAGES
        ]
        # The first update() is start-up: the time to say which heaps the file names in vain.
        self._npu_checked = False

    # -- discovery side -------------------------------------------------

    def update(self, found: dict[str, HeapSpec]) -> list[HeapEvent]:
        events: list[HeapEvent] = []
        with self._lock:
            for name in sorted(set(self._backends) - set(found)):
                backend = self._backends.pop(name)
                backend.close()
                events.append(HeapEvent(HeapEventKind.REMOVED, backend.spec))
            for name, spec in sorted(found.items()):
                known = self._backends.get(name)
                if known is not None and known.spec == spec:
                    continue
                if known is not None:  # same name, new device: replace
                    known.close()
                    events.append(HeapEvent(HeapEventKind.REMOVED, known.spec))
                backend = self._make_backend(spec)
                if self._probe is not None:
                    backend.load_methods = self._probe(backend)
                self._backends[name] = backend
                events.append(HeapEvent(HeapEventKind.ADDED, spec))
            if events:
                self._generation += 1
                self._eligible_memo.clear()
            for event in events:
                for sink in self._watchers:
                    sink(event)
        for event in events:
            log.info("heap %s: %s (%s)", event.kind.name.lower(), event.spec.name, event.spec.device_path or "memfd")
        if not self._npu_checked:
            self._npu_checked = True
            self._warn_absent_npu_heaps(set(found))
        return events

    def _make_backend(self, spec: HeapSpec) -> HeapBackend:
        if spec.kind is BackendKind.MEMFD:
            return MemfdBackend(spec, self._reserve)
        return _DEVICE_BACKENDS[spec.kind](spec)

    def _warn_absent_npu_heaps(self, present: set[str]) -> None:
        listed: list[str] = []
        for route in self._npu_routes:
            listed += [name for name in route.heap_order if name not in listed]
        absent = [name for name in listed if not any(c in present for c in self._candidates(name))]
        if absent:
            log.warning(
                "%s names heap(s) not present here: %s; NPU buffer types skip them while they are absent "
                "(and take their usage's route when none of theirs is present)",
                self._config.dma_heap_json,
                ", ".join(absent),
            )

    def close(self) -> None:
        with self._lock:
            for backend in self._backends.values():
                backend.close()
            self._backends.clear()
            for sink in self._watchers:
                sink(None)

    # -- client side ----------------------------------------------------

    @property
    def reserve(self) -> MemfdReserve | None:
        return self._reserve

    def specs(self) -> list[HeapSpec]:
        with self._lock:
            return [backend.spec for backend in self._backends.values()]

    def aliases_of(self, name: str) -> list[str]:
        """Aliases whose first present candidate is `name`."""
        with self._lock:
            present = set(self._backends)
        return sorted(
            alias
            for alias, candidates in self._config.aliases.items()
            if alias != name and next((c for c in candidates if c in present), None) == name
        )

    def load_methods(self, name: str) -> tuple[Method, ...]:
        with self._lock:
            backend = self._backends.get(name)
        return backend.load_methods if backend is not None else ()

    def usage_routes(self) -> dict[str, tuple[str, ...]]:
        return {DEFAULT_USAGE: self._config.probe_order, **self._config.usage}

    @property
    def dma_heap_json(self) -> Path | None:
        """The file the NPU routes came from (None: none was read)."""
        return self._config.dma_heap_json

    def npu_routes(self) -> list[NpuRoute]:
        """dma_heap.json's routes, by buffer type then NPU (none without the file)."""
        return list(self._npu_routes)

    def _npu_order(self, usage: str, npu_device: int | None) -> tuple[str, ...]:
        order: list[str] = []
        for route in self._npu_routes:
            if route.usage == usage and npu_device in (None, route.npu_device):
                order += [name for name in route.heap_order if name not in order]
        return tuple(order)

    def allowed(self, heap_name: str, caller: Caller) -> bool:
        rule = self._config.access.get(heap_name)
        return rule is None or rule.allows(caller.uid, caller.gids)

    def _candidates(self, name: str) -> tuple[str, ...]:
        return self._config.aliases.get(name, (name,))

    def resolve(self, heap: str, usage: str, caller: Caller, npu_device: int | None = None) -> HeapBackend:
        """The backend a request should allocate from. Raises HeapNotFound,
        AccessDenied or InvalidRequest with a message naming the way out."""
        return self.eligible(heap, usage, caller, npu_device)[0]

    def _usable(
        self, order: tuple[str, ...], present: dict[str, HeapBackend], caller: Caller
    ) -> tuple[list[HeapBackend], list[str]]:
        """The present and allowed backends of a route, and the present heaps denied."""
        denied: list[str] = []
        usable: list[HeapBackend] = []
        for entry in order:
            name = next((name for name in self._candidates(entry) if name in present), None)
            if name is None:
                continue
            if not self.allowed(name, caller):
                denied.append(name)
            elif present[name] not in usable:
                usable.append(present[name])
        return usable, denied

    def eligible(self, heap: str, usage: str, caller: Caller, npu_device: int | None = None) -> list[HeapBackend]:
        """Every backend the request may use, in preference order (one for
        a named heap; for a usage, each entry of dma_heap.json's route for
        it, else of its own route, that is present and allowed; `npu_device`
        narrows dma_heap.json's route to one NPU). Never empty: raises as
        resolve() does."""
        key = (heap, usage, caller, npu_device)
        with self._lock:
            known = self._eligible_memo.get(key)
            if known is not None:
                return list(known)
            present = dict(self._backends)
            generation = self._generation
        found = self._eligible(heap, usage, caller, npu_device, present)
        with self._lock:
            if generation == self._generation:
                if len(self._eligible_memo) >= ELIGIBLE_MEMO_ENTRIES:
                    self._eligible_memo.clear()
                self._eligible_memo[key] = tuple(found)
        return found

    def _eligible(
        self, heap: str, usage: str, caller: Caller, npu_device: int | None, present: dict[str, HeapBackend]
    ) -> list[HeapBackend]:
        if heap:
            # A present heap by that exact name wins over an alias of it.
            candidates = (heap,) if heap in present else self._candidates(heap)
            found = [name for name in candidates if name in present]
            if not found:
                tried = "" if candidates == (heap,) else f" (alias of {', '.join(candidates)})"
                raise HeapNotFound(
                    f"no heap named {heap!r}{tried} is present; present heaps: {', '.join(sorted(present))}"
                )
            if not self.allowed(found[0], caller):
                raise AccessDenied(f"uid {caller.uid} may not allocate from heap {found[0]!r} (see heaps.access)")
            return [present[found[0]]]
        routes = self.usage_routes()
        usage = usage or DEFAULT_USAGE
        if usage not in routes:
            raise InvalidRequest(f"unknown usage {usage!r}; known usages: {', '.join(sorted(routes))}")
        npu_order = self._npu_order(usage, npu_device)
        usable, npu_denied = self._usable(npu_order, present, caller)
        if usable:
            return usable
        usable, denied = self._usable(routes[usage], present, caller)
        if usable:
            return usable
        denied = [name for name in npu_denied if name not in denied] + denied
        if denied:
            raise AccessDenied(
                f"usage {usage!r}: uid {caller.uid} may not use any present heap of its route ({', '.join(denied)})"
            )
        listed = f"dma_heap.json: {', '.join(npu_order)}; route: " if npu_order else ""
        raise HeapNotFound(f"usage {usage!r}: none of its heaps is present ({listed}{', '.join(routes[usage])})")

    @contextmanager
    def watch(self, sink: EventSink) -> Iterator[list[HeapSpec]]:
        """The heaps present now; every event after that moment goes to
        `sink` (both taken under the lock, so none falls between). A sink
        runs with the registry's lock held and must only hand the event on
        (queue it); None means the registry closed."""
        with self._lock:
            self._watchers.add(sink)
            present = [backend.spec for backend in self._backends.values()]
        try:
            yield present
        finally:
            with self._lock:
                self._watchers.discard(sink)
