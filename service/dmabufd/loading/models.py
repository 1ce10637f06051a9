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
used first, when a new one would pass loading.model_budget_bytes (which
counts each model's buffers and its parsed header: header_cost()). The
model owns one reference on each of its buffers; every session that holds
it is entitled to receive them (heaps/buffer.py).

Charges: model memory counts against the model budget and, while they hold
it, against the quota of every uid that holds it (each pays the whole
model: it is what that uid can reach), so no uid can take more of the
budget than its quota allows. A uid that lets go of a model stays charged
for each buffer one of its processes still holds (a copy of an fd, a
mapping) until it is gone, as for a released buffer (Ledger.unhold_held). The header is parsed within
loading.max_header_bytes and loading.max_tensors.

Streaming: a load may hand the model's buffers to its caller before their
bytes are in (StreamSink.opened), then say which tensors are complete as
the loader reports landed chunks (Readiness). The model is published (and
shared) only once the load completed; until then it is nobody's but the
streaming session's, and a failed load takes back what it gave: buffers
that session still holds stay charged to its uid as lingering buffers, as
released ones do (sessions/ledger.py). A memfd's fds go out read-only, and
no other uid may reopen it for writing, before it is sealed.

Timing: a load's wall time counts allocation and I/O, as the loader's own
loads do; every load, streamed or not, also notes when its first tensor
with bytes had them all in (ResidentModel.first_tensor_seconds), from the
same start.

Locking: _lock guards the tables, holders, charges and the budget that
loads running have reserved. A load runs outside it; concurrent requests
for the same model wait for the first one's load (_loading).
Readiness._lock guards one load's per-tensor counts (a leaf).
"""

from __future__ import annotations

import bisect
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from dmabufd.broker import allocate_all
from dmabufd.config import LoadingConfig
from dmabufd.errors import InvalidRequest, QuotaExceeded
from dmabufd.heaps.backend import BackendKind, HeapBackend, round_to_page
from dmabufd.heaps.buffer import Buffer
from dmabufd.loading.loader import BufferPlan, CancelledFn, FileLoader, ProgressFn, TransferReport
from dmabufd.loading.method import Method
from dmabufd.loading.methods import DIO_ALIGN, Piece, writes_into_memfds
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
    # Set when the bytes are in; a published model always has it.
    report: TransferReport | None = None
    # From the start of the load (as report.wall_seconds counts it) until
    # the first tensor with bytes had them all in its buffer; a model with
    # no tensor bytes: its wall time.
    first_tensor_seconds: float = 0.0
    holders: dict[int, int] = field(default_factory=dict)  # session id -> references
    # uid -> sessions of it holding the model; each such uid is charged its bytes.
    charged: dict[int, int] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def bytes(self) -> int:
        return sum(buffer.size for buffer in self.buffers)

    @property
    def budget_bytes(self) -> int:
        """What the model costs loading.model_budget_bytes."""
        return self.bytes + header_cost(self.header)

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.put()


# What a resident model's parsed header costs the daemon, per byte of the
# header it was parsed from: tensor names, shapes and metadata live on as
# Python objects, 10 to 30 bytes of memory per byte of JSON (measured here
# with 65,536-tensor and 8 MiB-metadata headers). Counted against
# loading.model_budget_bytes with the buffers, so that models whose buffers
# are small cannot grow the daemon without bound.
HEADER_COST_PER_BYTE = 32


def header_cost(header: Header) -> int:
    return HEADER_COST_PER_BYTE * header.data_start


# A memfd accepts one write at a time (shmem's inode lock), so a model that
# the lanes write into memfds (direct-read, buffered-read) is cut into buffers of about
# this size, which they write into at once: a warm 512 MiB model loads in
# 0.13 s here against 0.22-0.24 s in one buffer (`make bench-load`).
MEMFD_MODEL_PART_BYTES = 128 << 20


def part_bytes(header: Header, kind: BackendKind, method: Method) -> int | None:
    """How large plan_model should make a model's buffers, short of the
    heap's largest (None: as large as the heap allows). The tensor bytes
    are cut into equal shares of at most MEMFD_MODEL_PART_BYTES."""
    if kind is not BackendKind.MEMFD or not writes_into_memfds(method, kind) or not header.tensors:
        return None
    total = header.tensors[-1].end - header.tensors[0].begin
    count = -(-total // MEMFD_MODEL_PART_BYTES)
    return -(-total // count) if count > 1 else None


def plan_model(
    header: Header, largest: int, part: int | None = None
) -> tuple[list[BufferPlan], dict[str, tuple[int, int]]]:
    """Pack the tensors, in file order, into buffers of at most `largest`
    bytes so that no tensor straddles two buffers (each must be one
    zero-copy array). Buffer offsets stay congruent to file offsets. With
    `part`, the tensor bytes are cut into shares of `part` bytes, and each
    tensor goes with the share that holds its middle: buffers of about
    `part` bytes, never cutting a tensor (one larger than that is a share
    of its own).

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

    def share(tensor: TensorEntry) -> int:
        """Which `part`-sized share of the tensor bytes holds the tensor's middle."""
        return ((tensor.begin + tensor.end) // 2 - header.tensors[0].begin) // part if part else 0

    for tensor in header.tensors:
        if group and (
            round_to_page(group[0].begin % DIO_ALIGN + tensor.end - group[0].begin) > largest
            or share(tensor) != share(group[0])
        ):
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


class StreamSink(Protocol):
    """Where a streamed load reports (the API's side of the stream)."""

    @property
    def pid(self) -> int:
        """The streaming client's process: if the load fails, what it
        holds of the buffers stays charged to its uid until it lets go."""

    def opened(self, model: ResidentModel) -> None:
        """The buffers exist, entitle the session and are booked nowhere
        else: send their fds. Runs on the load's thread; raising fails the
        load (and frees everything)."""

    def ready(self, indexes: list[int]) -> None:
        """These tensors (indexes into header.tensors) have all their bytes
        in their buffer. Called from the load's I/O threads, at most once
        per tensor; must not block."""


ReadyFn = Callable[[list[int]], None]


class Readiness:
    """Which tensors are complete, from the loader's landed(offset, length)
    calls: a tensor is ready when landed chunks cover all its bytes. Chunks
    land in any order, several at once, and never overlap; a chunk may land
    twice (the loader runs a load again by another method when an exporter
    refuses the first, loader.py), so a landed chunk is counted once, by
    its file offset. A count of the bytes still missing per tensor then
    suffices.

    Every load keeps one, for first_at; only a streamed one reports. With
    `hold_back` (a verified load) nothing is reported before finish(): a
    tensor is usable only once its bytes are checked.

    Cost: a bisect per chunk plus one step per tensor it touches; memory is
    one int and one flag per tensor and one int per chunk. Locking: _lock (a
    leaf) guards the counts; `report` is called after it is dropped."""

    def __init__(self, tensors: tuple[TensorEntry, ...], report: ReadyFn | None, *, hold_back: bool) -> None:
        self._tensors = tensors
        self._begins = [tensor.begin for tensor in tensors]
        self._missing = [tensor.nbytes for tensor in tensors]
        self._reported = [False] * len(tensors)
        self._landed: set[int] = set()
        self._report = report
        self._hold_back = hold_back
        self._lock = threading.Lock()
        self.first_at: float | None = None

    def start(self) -> None:
        """Report the zero-size tensors: they hold no bytes to wait for."""
        with self._lock:
            ready = self._take([index for index, missing in enumerate(self._missing) if missing == 0])
        self._emit(ready)

    def landed(self, file_offset: int, length: int) -> None:
        end = file_offset + length
        complete: list[int] = []
        with self._lock:
            if file_offset in self._landed:
                return
            self._landed.add(file_offset)
            index = max(bisect.bisect_right(self._begins, file_offset) - 1, 0)
            while index < len(self._tensors) and self._begins[index] < end:
                tensor = self._tensors[index]
                overlap = min(end, tensor.end) - max(file_offset, tensor.begin)
                if overlap > 0 and self._missing[index] > 0:
                    self._missing[index] -= overlap
                    if self._missing[index] == 0:
                        complete.append(index)
                index += 1
            if complete and self.first_at is None:
                self.first_at = time.monotonic()
            ready = [] if self._hold_back else self._take(complete)
        self._emit(ready)

    def finish(self) -> None:
        """The load completed (and was verified, if asked): whatever was not
        reported yet is ready now."""
        with self._lock:
            ready = self._take(range(len(self._tensors)))
        self._emit(ready)

    def _take(self, indexes: Iterable[int]) -> list[int]:
        """The indexes not reported yet, now marked reported (caller holds _lock)."""
        if self._report is None:
            return []
        taken = [index for index in indexes if not self._reported[index]]
        for index in taken:
            self._reported[index] = True
        return taken

    def _emit(self, ready: list[int]) -> None:
        if ready and self._report is not None:
            self._report(ready)


def _forbid_other_writers(buffer: Buffer) -> None:
    """Only the daemon's uid may open the memfd for writing: a streamed
    model's O_RDONLY fds go out before the seals are on, and anyone holding
    one could otherwise reopen it read-write through /proc/<pid>/fd. The
    execute bits stay as they are (a memfd with F_SEAL_EXEC refuses a mode
    change that touches them)."""
    mode = stat.S_IMODE(os.fstat(buffer.fd).st_mode)
    os.fchmod(buffer.fd, mode & ~(stat.S_IWGRP | stat.S_IWOTH))


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
        # Budget bytes reserved by loads running (_make_room), by model.
        self._reserved: dict[ModelKey, int] = {}
        self._next_id = 1

    def _key(self, source: SourceFile, backend: HeapBackend, uid: int) -> ModelKey:
        shared_across_uids = backend.spec.kind is BackendKind.MEMFD
        return (source.identity, backend.spec.name, None if shared_across_uids else uid)

    def acquire(
        self,
        session_id: int,
        uid: int,
        pid: int,
        source: SourceFile,
        how: ModelLoad,
        *,
        progress: ProgressFn,
        cancelled: CancelledFn,
        stream: StreamSink | None = None,
    ) -> tuple[ResidentModel, bool]:
        """The model in `source`, loaded now or already resident; the
        session holds a reference (and its uid is charged the model's
        bytes) until release(). Returns (model, shared).

        With `stream`, a load made by this call reports to it as it goes
        (StreamSink); a model that is resident, or that another session is
        loading, is returned whole, as without it."""
        key = self._key(source, how.backend, uid)
        while True:
            mine: threading.Event | None = None
            with self._lock:
                model = self._models.get(key)
                if model is not None:
                    self._hold(model, session_id, uid, pid)
                    break
                pending = self._loading.get(key)
                if pending is None:
                    pending = mine = self._loading[key] = threading.Event()
            if mine is not None:  # this call loads it; the lock is not held meanwhile
                model = self._load_and_publish(
                    key,
                    session_id,
                    uid,
                    source,
                    how,
                    loading=mine,
                    progress=progress,
                    cancelled=cancelled,
                    stream=stream,
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
                self.release(session_id, uid, pid, model.id)
                raise
        return model, True

    def _hold(self, model: ResidentModel, session_id: int, uid: int, pid: int) -> None:
        """One more reference of `session_id` (caller holds _lock). The
        first session of a uid charges the model to that uid's quota."""
        if uid not in model.charged:
            self._ledger.hold_adopting(uid, pid, model.buffers)
        model.charged[uid] = model.charged.get(uid, 0) + (session_id not in model.holders)
        model.holders[session_id] = model.holders.get(session_id, 0) + 1
        model.last_used = time.monotonic()
        for buffer in model.buffers:
            buffer.entitle(session_id)

    def _unhold(self, model: ResidentModel, session_id: int, uid: int, everything: bool) -> list[Buffer]:
        """Drop one (or every) reference of `session_id` (caller holds
        _lock). When the uid's last session lets go, returns the model's
        buffers, a reference taken on each, for _let_go() to settle the
        uid's charge once _lock is dropped; else []."""
        left = 0 if everything else model.holders[session_id] - 1
        if left:
            model.holders[session_id] = left
            return []
        del model.holders[session_id]
        for buffer in model.buffers:
            buffer.disentitle(session_id)
        model.charged[uid] -= 1
        if model.charged[uid]:
            return []
        del model.charged[uid]
        return [buffer.get() for buffer in model.buffers]

    def _let_go(self, uid: int, pid: int, buffers: list[Buffer]) -> None:
        """The uid's charge for a model it let go of ends for the buffers
        none of its processes still holds (an fd it kept, or a mapping);
        the rest stay charged until they are gone (Ledger.unhold_held)."""
        if buffers:
            self._ledger.unhold_held(uid, pid, buffers)

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
        stream: StreamSink | None,
    ) -> ResidentModel:
        """Load the model, make it resident held by the session, and wake
        whoever waited for it (also when the load failed: they retry)."""
        try:
            model = self._load(key, session_id, uid, source, how, progress=progress, cancelled=cancelled, stream=stream)
            with self._lock:
                self._models[key] = model
                self._by_id[model.id] = model
                self._reserved.pop(key, None)  # counted as resident from here
                # The load charged the uid already (see _load).
                model.charged[uid] = 1
                model.holders[session_id] = 1
                for buffer in model.buffers:
                    buffer.entitle(session_id)
            return model
        finally:
            with self._lock:
                del self._loading[key]
                self._reserved.pop(key, None)  # a load that failed
            loading.set()

    def _load(
        self,
        key: ModelKey,
        session_id: int,
        uid: int,
        source: SourceFile,
        how: ModelLoad,
        *,
        progress: ProgressFn,
        cancelled: CancelledFn,
        stream: StreamSink | None,
    ) -> ResidentModel:
        backend = how.backend
        header = read_header(
            source.buffered_fd,
            source.size,
            max_header_bytes=self._caps.max_header_bytes,
            max_tensors=self._caps.max_tensors,
        )
        plans, placement = plan_model(header, how.largest, part_bytes(header, backend.spec.kind, how.method))
        if len(plans) > how.max_buffers:
            raise InvalidRequest(
                f"the model needs {len(plans)} buffers of at most {format_size(how.largest)}; a call may deliver "
                f"{how.max_buffers} (heaps.max_batch): load it into a heap that allows larger buffers"
            )
        needed = sum(plan.size for plan in plans)
        self._make_room(key, needed + header_cost(header))
        # Charged before allocating, like any allocation; kept by the caller
        # (the model's first holder) if the load succeeds.
        self._ledger.hold(uid, needed, len(plans))
        began = time.monotonic()
        # From the take of prepared memfds to the last byte: the reserve
        # prepares nothing meanwhile (heaps/reserve.py).
        with self._loader.moving_bytes():
            try:
                buffers = allocate_all(backend, [plan.size for plan in plans], "dmabufd:model", prepared=True)
            except BaseException:
                self._ledger.unhold(uid, needed, len(plans))
                raise
            enforced = backend.spec.kind is BackendKind.MEMFD
            readiness = Readiness(header.tensors, stream.ready if stream else None, hold_back=how.verify)
            try:
                model = ResidentModel(
                    id=self._take_id(),
                    key=key,
                    header=header,
                    buffers=buffers,
                    plans=plans,
                    placement=placement,
                    buffer_ids=self._ledger.new_ids(len(buffers)),
                    read_only_enforced=enforced,
                )
                if stream is not None:
                    self._open_stream(model, session_id, stream)
                    readiness.start()
                transferring = time.monotonic()
                model.report = report = self._loader.transfer(
                    source,
                    backend,
                    [(buffer.allocation, plan) for buffer, plan in zip(buffers, plans, strict=True)],
                    how.method,
                    progress=progress,
                    cancelled=cancelled,
                    verify=how.verify,
                    fallback=how.method_chosen,
                    landed=readiness.landed,
                )
                if enforced:
                    for buffer in buffers:
                        buffer.seal_read_only(MODEL_SEALS)
            except BaseException:
                if stream is None:
                    for buffer in buffers:
                        buffer.put()
                    self._ledger.unhold(uid, needed, len(plans))
                else:
                    # Their fds may be out: the uid pays for what it still holds.
                    self._ledger.linger(uid, stream.pid, buffers)
                raise
        # Until the last byte landed (verification not included), from the allocation.
        report.wall_seconds += transferring - began
        first = report.wall_seconds if readiness.first_at is None else readiness.first_at - began
        # min(): the loader starts its clock a little after `transferring`.
        model.first_tensor_seconds = min(first, report.wall_seconds)
        readiness.finish()
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

    @staticmethod
    def _open_stream(model: ResidentModel, session_id: int, stream: StreamSink) -> None:
        """Give the session the model's buffers before their bytes are in."""
        if model.read_only_enforced:
            for buffer in model.buffers:
                _forbid_other_writers(buffer)
                # No seal yet (the loader still writes): only the O_RDONLY
                # fd that every read-only delivery sends.
                buffer.seal_read_only(0)
        for buffer in model.buffers:
            buffer.entitle(session_id)
        stream.opened(model)

    def _take_id(self) -> int:
        with self._lock:
            model_id = self._next_id
            self._next_id += 1
            return model_id

    def _make_room(self, key: ModelKey, needed: int) -> None:
        """Evict idle models until `needed` more fits the budget, and
        reserve it for the load of `key` until it is published or fails:
        loads running at once cannot together pass the budget."""
        if needed > self._budget:
            raise QuotaExceeded(
                f"the model needs {format_size(needed)} (its buffers, and its parsed header), more than the whole "
                f"model budget ({format_size(self._budget)}, loading.model_budget_bytes)"
            )
        evicted: list[ResidentModel] = []
        with self._lock:
            resident = sum(model.budget_bytes for model in self._models.values()) + sum(self._reserved.values())
            idle = sorted((m for m in self._models.values() if not m.holders), key=lambda m: m.last_used)
            while resident + needed > self._budget and idle:
                victim = idle.pop(0)
                del self._models[victim.key]
                del self._by_id[victim.id]
                resident -= victim.budget_bytes
                evicted.append(victim)
            if resident + needed > self._budget:
                raise QuotaExceeded(
                    f"the model needs {format_size(needed)} but resident models in use and loads running hold "
                    f"{format_size(resident)} of the {format_size(self._budget)} budget"
                )
            self._reserved[key] = needed
        for victim in evicted:
            log.info("model %d evicted (%s)", victim.id, format_size(victim.bytes))
            victim.close()

    def release(self, session_id: int, uid: int, pid: int, model_id: int) -> bool:
        with self._lock:
            model = self._by_id.get(model_id)
            if model is None or session_id not in model.holders:
                return False
            let_go = self._unhold(model, session_id, uid, everything=False)
            model.last_used = time.monotonic()
        self._let_go(uid, pid, let_go)
        return True

    def release_session(self, session_id: int, uid: int, pid: int) -> None:
        let_go: list[Buffer] = []
        with self._lock:
            for model in self._models.values():
                if session_id in model.holders:
                    let_go += self._unhold(model, session_id, uid, everything=True)
        self._let_go(uid, pid, let_go)

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
