"""Resident models: load a safetensors file once, share it with every
client that asks for the same file.

A model is keyed by the file's identity (device, inode, size, mtime), the
heap it lives in and, where the kernel cannot stop one client from writing
another's weights, the client's uid:

| backend  | what the kernel enforces                  | shared with        |
|----------|-------------------------------------------|--------------------|
| memfd    | F_SEAL_WRITE + F_SEAL_FUTURE_WRITE; fds    | every client       |
|          | handed out O_RDONLY: nobody can write      |                    |
| udmabuf  | nothing: a dma-buf fd stays O_RDWR and its | clients of the     |
|          | mmap is writable                           | same uid only      |
| DMA heap | nothing: heap buffers are allocated O_RDWR | clients of the     |
|          | to be loaded, and cannot be downgraded     | same uid only      |

Lifetime: a model stays resident while any session holds it and after, so
the next client finds it; models nobody holds are evicted, least recently
used first, when a new one would pass loading.model_budget_bytes. Model
memory is counted against that budget, not against per-uid quotas.

Locking: _lock guards the tables. A load runs outside it; concurrent
requests for the same model wait for the first one's load (_loading).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dmabufd.broker import allocate_all
from dmabufd.errors import InvalidRequest, QuotaExceeded
from dmabufd.heaps.backend import Allocation, BackendKind, HeapBackend, round_to_page
from dmabufd.loading.loader import BufferPlan, CancelledFn, FileLoader, ProgressFn, TransferReport
from dmabufd.loading.method import Method
from dmabufd.loading.methods import DIO_ALIGN, Piece
from dmabufd.loading.safetensors import Header, TensorEntry, read_header
from dmabufd.loading.source import FileIdentity, SourceFile
from dmabufd_common import uapi
from dmabufd_common.units import format_size

log = logging.getLogger(__name__)

ModelKey = tuple[FileIdentity, str, int | None]
# Hands out n fresh buffer ids (from the ledger's sequence).
IdSource = Callable[[int], list[int]]


@dataclass(frozen=True)
class ModelLoad:
    """How to load a model that is not resident yet."""

    backend: HeapBackend
    method: Method
    verify: bool
    largest: int


@dataclass
class ResidentModel:
    id: int
    key: ModelKey
    header: Header
    allocations: list[Allocation]
    plans: list[BufferPlan]
    # Per tensor: (index of its buffer, offset in that buffer).
    placement: dict[str, tuple[int, int]]
    buffer_ids: list[int]
    # The fds clients receive (read-only reopens where enforceable).
    share_fds: list[int]
    read_only_enforced: bool
    report: TransferReport
    holders: dict[int, int] = field(default_factory=dict)  # session id -> references
    last_used: float = field(default_factory=time.monotonic)

    @property
    def bytes(self) -> int:
        return sum(allocation.size for allocation in self.allocations)

    def close(self) -> None:
        for fd in self.share_fds:
            if fd not in (allocation.fd for allocation in self.allocations):
                os.close(fd)
        for allocation in self.allocations:
            allocation.close()


def plan_model(header: Header, largest: int) -> tuple[list[BufferPlan], dict[str, tuple[int, int]]]:
    """Pack the tensors, in file order, into buffers of at most `largest`
    bytes so that no tensor straddles two buffers (each must be one
    zero-copy array). Buffer offsets stay congruent to file offsets."""
    plans: list[BufferPlan] = []
    placement: dict[str, tuple[int, int]] = {}
    group: list[TensorEntry] = []

    def close_group() -> None:
        start, end = group[0].begin, group[-1].end
        buffer_offset = start % DIO_ALIGN
        piece = Piece(start, buffer_offset, max(end - start, 1))
        for tensor in group:
            placement[tensor.name] = (len(plans), buffer_offset + tensor.begin - start)
        plans.append(BufferPlan(piece, round_to_page(buffer_offset + piece.length)))
        group.clear()

    for tensor in header.tensors:
        if group and round_to_page(group[0].begin % DIO_ALIGN + tensor.end - group[0].begin) > largest:
            close_group()
        if round_to_page(tensor.begin % DIO_ALIGN + tensor.nbytes) > largest:
            raise InvalidRequest(
                f"tensor {tensor.name!r} ({format_size(tensor.nbytes)}) is larger than the largest buffer "
                f"this heap allows ({format_size(largest)}); load the model into another heap"
            )
        group.append(tensor)
    if group:
        close_group()
    return plans, placement


def _seal_read_only(allocation: Allocation) -> int:
    """Seal a memfd against every write and return a read-only fd of it."""
    fcntl.fcntl(allocation.fd, fcntl.F_ADD_SEALS, uapi.F_SEAL_WRITE | uapi.F_SEAL_FUTURE_WRITE)
    return os.open(f"/proc/self/fd/{allocation.fd}", os.O_RDONLY | os.O_CLOEXEC)


class ModelCache:
    def __init__(self, loader: FileLoader, budget_bytes: int, new_ids: IdSource) -> None:
        self._loader = loader
        self._budget = budget_bytes
        self._new_ids = new_ids
        self._lock = threading.Lock()
        self._models: dict[ModelKey, ResidentModel] = {}
        self._by_id: dict[int, ResidentModel] = {}
        self._loading: dict[ModelKey, threading.Event] = {}
        self._next_id = 1

    def _key(self, source: SourceFile, backend: HeapBackend, uid: int) -> ModelKey:
        shared_across_uids = backend.spec.kind is BackendKind.MEMFD
        return (source.identity, backend.spec.name, None if shared_across_uids else uid)

    def acquire(
        self,
        session_id: int,
        uid: int,
        source: SourceFile,
        how: ModelLoad,
        *,
        progress: ProgressFn,
        cancelled: CancelledFn,
    ) -> tuple[ResidentModel, bool]:
        """The model in `source`, loaded now or already resident; the
        session holds a reference until release(). Returns (model, shared)."""
        key = self._key(source, how.backend, uid)
        while True:
            mine: threading.Event | None = None
            with self._lock:
                model = self._models.get(key)
                if model is not None:
                    model.holders[session_id] = model.holders.get(session_id, 0) + 1
                    model.last_used = time.monotonic()
                    break
                pending = self._loading.get(key)
                if pending is None:
                    pending = mine = self._loading[key] = threading.Event()
            if mine is not None:  # this call loads it; the lock is not held meanwhile
                model = self._load_and_publish(
                    key, session_id, source, how, loading=mine, progress=progress, cancelled=cancelled
                )
                return model, False
            pending.wait()  # another session is loading it: share its result
        if how.verify:
            # The resident bytes, checked against this caller's file (the
            # caller's method is moot: nothing is loaded).
            try:
                self._loader.verify(source, list(zip(model.allocations, model.plans, strict=True)))
            except BaseException:
                self.release(session_id, model.id)
                raise
        return model, True

    def _load_and_publish(
        self,
        key: ModelKey,
        session_id: int,
        source: SourceFile,
        how: ModelLoad,
        *,
        loading: threading.Event,
        progress: ProgressFn,
        cancelled: CancelledFn,
    ) -> ResidentModel:
        """Load the model, make it resident held by the session, and wake
        whoever waited for it (also when the load failed: they retry)."""
        try:
            model = self._load(key, source, how, progress, cancelled)
            with self._lock:
                self._models[key] = model
                self._by_id[model.id] = model
                model.holders[session_id] = 1
            return model
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()

    def _load(
        self, key: ModelKey, source: SourceFile, how: ModelLoad, progress: ProgressFn, cancelled: CancelledFn
    ) -> ResidentModel:
        backend = how.backend
        header = read_header(source.buffered_fd, source.size)
        if not header.tensors:
            raise InvalidRequest("the model has no tensors")
        plans, placement = plan_model(header, how.largest)
        needed = sum(plan.size for plan in plans)
        self._make_room(needed)
        allocations = allocate_all(backend, [plan.size for plan in plans], "dmabufd:model")
        share_fds: list[int] = []
        try:
            report = self._loader.transfer(
                source,
                list(zip(allocations, plans, strict=True)),
                how.method,
                progress=progress,
                cancelled=cancelled,
                verify=how.verify,
            )
            enforced = backend.spec.kind is BackendKind.MEMFD
            share_fds = [_seal_read_only(a) if enforced else a.fd for a in allocations]
        except BaseException:
            for fd in share_fds:
                os.close(fd)
            for allocation in allocations:
                allocation.close()
            raise
        model = ResidentModel(
            id=self._take_id(),
            key=key,
            header=header,
            allocations=allocations,
            plans=plans,
            placement=placement,
            buffer_ids=self._new_ids(len(allocations)),
            share_fds=share_fds,
            read_only_enforced=enforced,
            report=report,
        )
        log.info(
            "model %d resident: %d tensors, %s in %d %s buffer(s), %s",
            model.id,
            len(header.tensors),
            format_size(model.bytes),
            len(allocations),
            backend.spec.name,
            "read-only enforced" if enforced else f"shared with uid {key[2]} only",
        )
        return model

    def _take_id(self) -> int:
        with self._lock:
            model_id = self._next_id
            self._next_id += 1
            return model_id

    def _make_room(self, needed: int) -> None:
        if needed > self._budget:
            raise QuotaExceeded(
                f"the model needs {format_size(needed)}, more than the whole model budget "
                f"({format_size(self._budget)}, loading.model_budget_bytes)"
            )
        evicted: list[ResidentModel] = []
        with self._lock:
            resident = sum(model.bytes for model in self._models.values())
            idle = sorted((m for m in self._models.values() if not m.holders), key=lambda m: m.last_used)
            while resident + needed > self._budget and idle:
                victim = idle.pop(0)
                del self._models[victim.key]
                del self._by_id[victim.id]
                resident -= victim.bytes
                evicted.append(victim)
            if resident + needed > self._budget:
                raise QuotaExceeded(
                    f"the model needs {format_size(needed)} but resident models in use hold "
                    f"{format_size(resident)} of the {format_size(self._budget)} budget"
                )
        for victim in evicted:
            log.info("model %d evicted (%s)", victim.id, format_size(victim.bytes))
            victim.close()

    def release(self, session_id: int, model_id: int) -> bool:
        with self._lock:
            model = self._by_id.get(model_id)
            if model is None or session_id not in model.holders:
                return False
            model.holders[session_id] -= 1
            if model.holders[session_id] == 0:
                del model.holders[session_id]
            model.last_used = time.monotonic()
            return True

    def release_session(self, session_id: int) -> None:
        with self._lock:
            for model in self._models.values():
                model.holders.pop(session_id, None)

    def resident(self) -> tuple[int, int]:
        """(models, bytes) resident now."""
        with self._lock:
            return len(self._models), sum(model.bytes for model in self._models.values())

    def close(self) -> None:
        with self._lock:
            models = list(self._models.values())
            self._models.clear()
            self._by_id.clear()
        for model in models:
            model.close()
