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
used first, when a new one would pass loading.model_budget_bytes. The
model owns one reference on each of its buffers; every session that holds
it is entitled to receive them (heaps/buffer.py).

Charges: model memory counts against the model budget and, while they hold
it, against the quota of every uid that holds it (each pays the whole
model: it is what that uid can reach), so no uid can take more of the
budget than its quota allows. The header is parsed within
loading.max_header_bytes and loading.max_tensors.

Locking: _lock guards the tables, holders and charges. A load runs outside
it; concurrent requests for the same model wait for the first one's load
(_loading).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from dmabufd.broker import allocate_all
from dmabufd.config import LoadingConfig
from dmabufd.errors import InvalidRequest, QuotaExceeded
from dmabufd.heaps.backend import BackendKind, HeapBackend, round_to_page
from dmabufd.heaps.buffer import Buffer
from dmabufd.loading.loader import BufferPlan, CancelledFn, FileLoader, ProgressFn, TransferReport
from dmabufd.loading.method import Method
from dmabufd.loading.methods import DIO_ALIGN, Piece
from dmabufd.loading.safetensors import Header, TensorEntry, quoted, read_header
from dmabufd.loading.source import FileIdentity, SourceFile
from dmabufd.sessions.ledger import Ledger
from dmabufd_common import uapi
from dmabufd_common.units import format_size

log = logging.getLogger(__name__)

ModelKey = tuple[FileIdentity, str, int | None]


@dataclass(frozen=True)
class ModelLoad:
    """How to load a model that is not resident yet."""

    backend: HeapBackend
    method: Method
    # Whether the daemon chose the method (it may then change it, loader.py).
    method_chosen: bool
    verify: bool
    largest: int
    # A call delivers at most this many buffers (heaps.max_batch).
    max_buffers: int


@dataclass
class ResidentModel:
    """Lifetime: owns one reference on each of its buffers from the load
    until close() (evicted, or daemon stop)."""

    id: int
    key: ModelKey
    header: Header
    buffers: list[Buffer]
    plans: list[BufferPlan]
    # Per tensor: (index of its buffer, offset in that buffer).
    placement: dict[str, tuple[int, int]]
    buffer_ids: list[int]
    # Sealed memfds: every client gets the buffers' O_RDONLY fds.
    read_only_enforced: bool
    report: TransferReport
    holders: dict[int, int] = field(default_factory=dict)  # session id -> references
    # uid -> sessions of it holding the model; each such uid is charged its bytes.
    charged: dict[int, int] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def bytes(self) -> int:
        return sum(buffer.size for buffer in self.buffers)

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.put()


def plan_model(header: Header, largest: int) -> tuple[list[BufferPlan], dict[str, tuple[int, int]]]:
    """Pack the tensors, in file order, into buffers of at most `largest`
    bytes so that no tensor straddles two buffers (each must be one
    zero-copy array). Buffer offsets stay congruent to file offsets.

    A zero-size tensor is placed at its file offset in the buffer of the
    tensors around it (possibly at that buffer's end). A file with no tensor
    bytes at all (only __metadata__, or only zero-size tensors) needs no
    buffer: the result is then ([], {}) and zero-size tensors have no
    placement; whoever describes them must do so without a buffer."""
    plans: list[BufferPlan] = []
    placement: dict[str, tuple[int, int]] = {}
    group: list[TensorEntry] = []

    def close_group() -> None:
        start, end = group[0].begin, group[-1].end
        if end == start:  # zero-size tensors only: nothing to load
            group.clear()
            return
        buffer_offset = start % DIO_ALIGN
        piece = Piece(start, buffer_offset, end - start)
        for tensor in group:
            placement[tensor.name] = (len(plans), buffer_offset + tensor.begin - start)
        plans.append(BufferPlan(piece, round_to_page(buffer_offset + piece.length)))
        group.clear()

    for tensor in header.tensors:
        if group and round_to_page(group[0].begin % DIO_ALIGN + tensor.end - group[0].begin) > largest:
            close_group()
        if round_to_page(tensor.begin % DIO_ALIGN + tensor.nbytes) > largest:
            raise InvalidRequest(
                f"tensor {quoted(tensor.name)} ({format_size(tensor.nbytes)}) is larger than the largest buffer "
                f"this heap allows ({format_size(largest)}); load the model into another heap"
            )
        group.append(tensor)
    if group:
        close_group()
    return plans, placement


# Sealing a model's memfd against every write, by anyone, from now on.
MODEL_SEALS = uapi.F_SEAL_WRITE | uapi.F_SEAL_FUTURE_WRITE


class ModelCache:
    """Locking: _lock guards the tables and every model's holders and
    charges; it is held across no syscall and no call into another
    component except the ledger's charge bookkeeping (a leaf lock)."""

    def __init__(self, loader: FileLoader, ledger: Ledger, config: LoadingConfig) -> None:
        self._loader = loader
        self._ledger = ledger
        self._budget = config.model_budget_bytes
        self._caps = config
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
        session holds a reference (and its uid is charged the model's
        bytes) until release(). Returns (model, shared)."""
        key = self._key(source, how.backend, uid)
        while True:
            mine: threading.Event | None = None
            with self._lock:
                model = self._models.get(key)
                if model is not None:
                    self._hold(model, session_id, uid)
                    break
                pending = self._loading.get(key)
                if pending is None:
                    pending = mine = self._loading[key] = threading.Event()
            if mine is not None:  # this call loads it; the lock is not held meanwhile
                model = self._load_and_publish(
                    key, session_id, uid, source, how, loading=mine, progress=progress, cancelled=cancelled
                )
                return model, False
            pending.wait()  # another session is loading it: share its result
        if how.verify:
            # The resident bytes, checked against this caller's file (the
            # caller's method is moot: nothing is loaded).
            try:
                targets = [(b.allocation, plan) for b, plan in zip(model.buffers, model.plans, strict=True)]
                self._loader.verify(source, targets)
            except BaseException:
                self.release(session_id, uid, model.id)
                raise
        return model, True

    def _hold(self, model: ResidentModel, session_id: int, uid: int) -> None:
        """One more reference of `session_id` (caller holds _lock). The
        first session of a uid charges the model to that uid's quota."""
        if uid not in model.charged:
            self._ledger.hold(uid, model.bytes, len(model.buffers))
        model.charged[uid] = model.charged.get(uid, 0) + (session_id not in model.holders)
        model.holders[session_id] = model.holders.get(session_id, 0) + 1
        model.last_used = time.monotonic()
        for buffer in model.buffers:
            buffer.entitle(session_id)

    def _unhold(self, model: ResidentModel, session_id: int, uid: int, everything: bool) -> None:
        """Drop one (or every) reference of `session_id` (caller holds _lock)."""
        left = 0 if everything else model.holders[session_id] - 1
        if left:
            model.holders[session_id] = left
            return
        del model.holders[session_id]
        for buffer in model.buffers:
            buffer.disentitle(session_id)
        model.charged[uid] -= 1
        if not model.charged[uid]:
            del model.charged[uid]
            self._ledger.unhold(uid, model.bytes, len(model.buffers))

    def _load_and_publish(
        self,
        key: ModelKey,
        session_id: int,
        uid: int,
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
            model = self._load(key, uid, source, how, progress=progress, cancelled=cancelled)
            with self._lock:
                self._models[key] = model
                self._by_id[model.id] = model
                # The load charged the uid already (see _load).
                model.charged[uid] = 1
                model.holders[session_id] = 1
                for buffer in model.buffers:
                    buffer.entitle(session_id)
            return model
        finally:
            with self._lock:
                del self._loading[key]
            loading.set()

    def _load(
        self,
        key: ModelKey,
        uid: int,
        source: SourceFile,
        how: ModelLoad,
        *,
        progress: ProgressFn,
        cancelled: CancelledFn,
    ) -> ResidentModel:
        backend = how.backend
        header = read_header(
            source.buffered_fd,
            source.size,
            max_header_bytes=self._caps.max_header_bytes,
            max_tensors=self._caps.max_tensors,
        )
        plans, placement = plan_model(header, how.largest)
        if len(plans) > how.max_buffers:
            raise InvalidRequest(
                f"the model needs {len(plans)} buffers of at most {format_size(how.largest)}; a call may deliver "
                f"{how.max_buffers} (heaps.max_batch): load it into a heap that allows larger buffers"
            )
        needed = sum(plan.size for plan in plans)
        self._make_room(needed)
        # Charged before allocating, like any allocation; kept by the caller
        # (the model's first holder) if the load succeeds.
        self._ledger.hold(uid, needed, len(plans))
        try:
            buffers = allocate_all(backend, [plan.size for plan in plans], "dmabufd:model")
            try:
                report = self._loader.transfer(
                    source,
                    backend,
                    [(buffer.allocation, plan) for buffer, plan in zip(buffers, plans, strict=True)],
                    how.method,
                    progress=progress,
                    cancelled=cancelled,
                    verify=how.verify,
                    fallback=how.method_chosen,
                )
                enforced = backend.spec.kind is BackendKind.MEMFD
                if enforced:
                    for buffer in buffers:
                        buffer.seal_read_only(MODEL_SEALS)
            except BaseException:
                for buffer in buffers:
                    buffer.put()
                raise
        except BaseException:
            self._ledger.unhold(uid, needed, len(plans))
            raise
        model = ResidentModel(
            id=self._take_id(),
            key=key,
            header=header,
            buffers=buffers,
            plans=plans,
            placement=placement,
            buffer_ids=self._ledger.new_ids(len(buffers)),
            read_only_enforced=enforced,
            report=report,
        )
        log.info(
            "model %d resident: %d tensors, %s in %d %s buffer(s), %s",
            model.id,
            len(header.tensors),
            format_size(model.bytes),
            len(buffers),
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

    def release(self, session_id: int, uid: int, model_id: int) -> bool:
        with self._lock:
            model = self._by_id.get(model_id)
            if model is None or session_id not in model.holders:
                return False
            self._unhold(model, session_id, uid, everything=False)
            model.last_used = time.monotonic()
            return True

    def release_session(self, session_id: int, uid: int) -> None:
        with self._lock:
            for model in self._models.values():
                if session_id in model.holders:
                    self._unhold(model, session_id, uid, everything=True)

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
