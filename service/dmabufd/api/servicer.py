"""dmabufd.v1.BufferService: translation between gRPC and the daemon.

Each method claims the caller's session (token + ticket, see
sessions/session.py), calls into the broker, ledger or registry, and turns
a DmabufdError into the call's status. Anything else is a bug: it is logged
with its traceback and reported as INTERNAL, and the daemon serves on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc

from dmabufd.broker import BufferBroker
from dmabufd.config import AccessRule, LoadingConfig
from dmabufd.errors import BufferNotFound, DmabufdError, InvalidRequest
from dmabufd.heaps.backend import PAGE_SIZE, HeapSpec
from dmabufd.heaps.registry import HeapEventKind, HeapRegistry
from dmabufd.loading.loader import (
    CancelledFn,
    FileLoader,
    LoadOutcome,
    LoadRequest,
    ProgressFn,
    choose_heap,
    choose_method,
)
from dmabufd.loading.method import Method
from dmabufd.loading.models import ModelCache, ModelLoad, ResidentModel
from dmabufd.loading.source import SourceFile, close_quietly, from_client_fd, open_as_client
from dmabufd.pools.pool import FormatKey, Pool, PoolTable
from dmabufd.sessions import procfs
from dmabufd.sessions.grants import GrantEntry, GrantTable, read_only_fds
from dmabufd.sessions.ledger import BufferRecord, Ledger
from dmabufd.sessions.session import Session, SessionTable
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc
from dmabufd_common.fdwire import SESSION_METADATA_KEY, TICKET_METADATA_KEY

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a WatchHeaps stream checks that its client is still there.
WATCH_POLL_S = 0.5
# How often a load reports progress (and notices a cancelled call).
PROGRESS_INTERVAL_S = 0.25
_EVENT_KINDS = {HeapEventKind.ADDED: pb.HeapEvent.KIND_ADDED, HeapEventKind.REMOVED: pb.HeapEvent.KIND_REMOVED}


def _method(value: int) -> Method:
    try:
        return Method(value)
    except ValueError:
        raise InvalidRequest(f"unknown load method {value}") from None


def buffer_info(record: BufferRecord) -> pb.BufferInfo:
    return pb.BufferInfo(
        id=record.id,
        size=record.size,
        heap=record.heap,
        backend=pb.Backend.ValueType(record.kind.value),
        kernel_name=record.kernel_name,
        usage=record.usage,
        created_at=record.created_at,
        inode=record.allocation.identity[1],
    )


class BufferService(pb_grpc.BufferServiceServicer):
    def __init__(
        self,
        *,
        sessions: SessionTable,
        registry: HeapRegistry,
        ledger: Ledger,
        broker: BufferBroker,
        admins: AccessRule,
        loader: FileLoader,
        models: ModelCache,
        loading: LoadingConfig,
        pools: PoolTable,
        grants: GrantTable,
    ) -> None:
        self._pools = pools
        self._grants = grants
        self._admins = admins
        self._loader = loader
        self._models = models
        self._loading = loading
        self._sessions = sessions
        self._registry = registry
        self._ledger = ledger
        self._broker = broker

    # -- plumbing -------------------------------------------------------

    def _abort(self, context: grpc.ServicerContext, error: DmabufdError) -> NoReturn:
        if error.status in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            self._ledger.count_denial()
        context.abort(error.status, str(error))

    def _claim(self, context: grpc.ServicerContext) -> tuple[Session, bytes]:
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        ticket = metadata.get(TICKET_METADATA_KEY)
        session = self._sessions.claim(metadata.get(SESSION_METADATA_KEY), ticket)
        return session, bytes.fromhex(ticket or "")

    def _serve(self, context: grpc.ServicerContext, handler: Callable[[Session, bytes], T]) -> T:
        try:
            session, ticket = self._claim(context)
            return handler(session, ticket)
        except DmabufdError as error:
            self._abort(context, error)
        except Exception:
            log.exception("internal error")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in dmabufd; see the daemon's log")

    def _heap(self, spec: HeapSpec, session: Session) -> pb.Heap:
        return pb.Heap(
            name=spec.name,
            device_path=spec.device_path,
            capabilities=pb.HeapCapabilities(
                backend=pb.Backend.ValueType(spec.kind.value),
                device_importable=spec.device_importable,
                max_buffer_bytes=spec.max_buffer_bytes or self._broker.max_buffer_bytes,
                zeroed=True,
                cpu_sync_required=spec.cpu_sync_required,
                granule_bytes=PAGE_SIZE,
                load_methods=[
                    pb.LoadMethod.ValueType(method.value) for method in self._registry.load_methods(spec.name)
                ],
            ),
            aliases=self._registry.aliases_of(spec.name),
            allowed=self._registry.allowed(spec.name, self._broker.caller(session)),
        )

    # -- methods --------------------------------------------------------

    def ListHeaps(self, request: pb.ListHeapsRequest, context: grpc.ServicerContext) -> pb.ListHeapsResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ListHeapsResponse:
            routes = [
                pb.UsageRoute(usage=usage, heap_order=order)
                for usage, order in sorted(self._registry.usage_routes().items())
            ]
            heaps = [self._heap(spec, session) for spec in self._registry.specs()]
            return pb.ListHeapsResponse(heaps=heaps, usage_routes=routes)

        return self._serve(context, handle)

    def WatchHeaps(self, request: pb.WatchHeapsRequest, context: grpc.ServicerContext) -> Iterator[pb.HeapEvent]:
        session, _ = self._serve(context, lambda session, ticket: (session, ticket))
        with self._registry.watch() as (present, events):
            if request.include_existing:
                for spec in present:
                    yield pb.HeapEvent(kind=pb.HeapEvent.KIND_ADDED, heap=self._heap(spec, session))
                yield pb.HeapEvent(kind=pb.HeapEvent.KIND_SYNCED)
            while context.is_active() and not session.closed:
                try:
                    event = events.get(timeout=WATCH_POLL_S)
                except queue.Empty:
                    continue
                if event is None:
                    return
                yield pb.HeapEvent(kind=_EVENT_KINDS[event.kind], heap=self._heap(event.spec, session))

    def Allocate(self, request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        def handle(session: Session, ticket: bytes) -> pb.AllocateResponse:
            records = self._broker.allocate(
                session,
                ticket,
                size=request.size,
                count=request.count or 1,
                heap=request.heap,
                usage=request.usage,
                label=request.name,
            )
            return pb.AllocateResponse(buffers=[buffer_info(record) for record in records])

        return self._serve(context, handle)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ReleaseResponse:
            return pb.ReleaseResponse(released_bytes=self._ledger.release(session, list(request.buffer_ids)))

        return self._serve(context, handle)

    def ListBuffers(self, request: pb.ListBuffersRequest, context: grpc.ServicerContext) -> pb.ListBuffersResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ListBuffersResponse:
            records = self._ledger.session_buffers(session.id)
            return pb.ListBuffersResponse(buffers=[buffer_info(record) for record in records])

        return self._serve(context, handle)

    def DescribeBuffer(self, request: pb.DescribeBufferRequest, context: grpc.ServicerContext) -> pb.BufferInfo:
        return self._serve(context, lambda session, _: buffer_info(self._ledger.find(session, request.buffer_id)))

    def GetStats(self, request: pb.GetStatsRequest, context: grpc.ServicerContext) -> pb.Stats:
        return self._serve(context, lambda session, _: self._stats(session, request.check_proc))

    def _stats(self, caller: Session, check_proc: bool) -> pb.Stats:
        admins = self._admins.allows(caller.peer.uid, caller.peer.gids)
        sessions = [s for s in self._sessions.sessions() if admins or s.peer.uid == caller.peer.uid]
        buffers = [r for r in self._ledger.all_buffers() if r.session_id in {s.id for s in sessions}]
        stats = pb.Stats(all_clients=admins)
        heaps: dict[str, pb.HeapStats] = {}
        for session in sessions:
            held = [record for record in buffers if record.session_id == session.id]
            quota = self._ledger.quota(session.peer.uid)
            client = pb.ClientStats(
                session_id=session.id,
                pid=session.peer.pid,
                uid=session.peer.uid,
                gid=session.peer.gid,
                command=session.peer.command,
                buffer_count=len(held),
                bytes=sum(record.size for record in held),
                quota_bytes=quota.max_bytes,
                quota_buffers=quota.max_buffers,
                connected_at=session.connected_at,
            )
            if check_proc:
                holdings = procfs.open_files(session.peer.pid, (r.allocation.identity for r in held))
                seen = [record for record in held if record.allocation.identity in holdings.files]
                client.proc_checked = holdings.readable
                client.proc_buffer_count = len(seen)
                client.proc_bytes = sum(record.size for record in seen)
            stats.clients.append(client)
        for record in buffers:
            heap = heaps.setdefault(record.heap, pb.HeapStats(heap=record.heap))
            heap.buffer_count += 1
            heap.bytes += record.size
        stats.heaps.extend(heaps[name] for name in sorted(heaps))
        stats.total_buffers = len(buffers)
        stats.total_bytes = sum(record.size for record in buffers)
        totals = self._ledger.totals()
        stats.allocations, stats.releases, stats.denials = totals.allocations, totals.releases, totals.denials
        stats.sessions_opened, stats.sessions_closed = self._sessions.opened, self._sessions.closed
        stats.models, stats.model_bytes = self._models.resident()
        return stats

    # -- loading ----------------------------------------------------------

    def _open_source(self, session: Session, ticket: bytes, source: pb.FileSource) -> SourceFile:
        """The file a load names: the fd sent with the call's ticket, or a
        path opened with the client's credentials."""
        kind = source.WhichOneof("source")
        deposited = self._sessions.take_file(session, ticket)
        if kind == "path":
            close_quietly(deposited)
            return open_as_client(source.path, session.peer, self._loading.roots)
        if deposited is None:
            raise InvalidRequest("no file: send its fd in a FILE frame with the call's ticket, or name a path")
        return from_client_fd(deposited)

    def _prepare(self, context: grpc.ServicerContext, step: Callable[[], T], source: SourceFile | None = None) -> T:
        """Run one step before a load starts; on error, close the source
        (if it is open already) and fail the call with the error's status."""
        try:
            return step()
        except DmabufdError as error:
            if source is not None:
                source.close()
            self._abort(context, error)
        except Exception:
            if source is not None:
                source.close()
            log.exception("internal error preparing a load")
            context.abort(grpc.StatusCode.INTERNAL, "internal error in dmabufd; see the daemon's log")

    def _stream(
        self,
        context: grpc.ServicerContext,
        total: int,
        work: Callable[[ProgressFn, CancelledFn], pb.LoadProgress],
    ) -> Iterator[pb.LoadProgress]:
        """Run `work` on its own thread; stream progress until it ends.
        A client that cancels (or whose deadline passes) stops the load.
        The stream never ends before the work does: the caller closes the
        file afterwards, and it must not close it under a running load."""
        done = [0]
        lock = threading.Lock()
        outcome: list[pb.LoadProgress | BaseException] = []
        finished = threading.Event()
        abandoned = threading.Event()

        def progress(nbytes: int) -> None:
            with lock:
                done[0] += nbytes

        def cancelled() -> bool:
            return abandoned.is_set() or not context.is_active()

        def run() -> None:
            try:
                outcome.append(work(progress, cancelled))
            except BaseException as error:
                outcome.append(error)
                if isinstance(error, DmabufdError):
                    log.info("load failed: %s (%s)", error, error.status.name)
            finally:
                finished.set()

        threading.Thread(target=run, name="load", daemon=True).start()
        reported = -1
        try:
            while not finished.wait(PROGRESS_INTERVAL_S):
                with lock:
                    current = done[0]
                if current != reported:
                    reported = current
                    yield pb.LoadProgress(bytes_done=current, bytes_total=total)
        finally:
            abandoned.set()  # the client went away mid-stream (GeneratorExit)
            finished.wait()
        result = outcome[0]
        if isinstance(result, DmabufdError):
            self._abort(context, result)
        if isinstance(result, BaseException):
            log.error("load failed", exc_info=result)
            context.abort(grpc.StatusCode.INTERNAL, "internal error in dmabufd; see the daemon's log")
        yield result

    def LoadFile(self, request: pb.LoadFileRequest, context: grpc.ServicerContext) -> Iterator[pb.LoadProgress]:
        session, ticket = self._serve(context, lambda session, ticket: (session, ticket))
        source = self._prepare(context, lambda: self._open_source(session, ticket, request.source))
        offset, length = self._prepare(
            context, lambda: source.check_range(request.source.offset, request.source.length), source
        )
        method = self._prepare(context, lambda: _method(request.method), source)
        load = LoadRequest(
            offset=offset,
            length=length,
            heap=request.heap,
            usage=request.usage,
            label=request.name,
            method=method,
            verify=request.verify,
            max_buffer_bytes=request.max_buffer_bytes,
        )

        def work(progress: ProgressFn, cancelled: CancelledFn) -> pb.LoadProgress:
            outcome = self._loader.load(session, ticket, source, load, progress=progress, cancelled=cancelled)
            return pb.LoadProgress(bytes_done=length, bytes_total=length, result=self._result(outcome))

        try:
            yield from self._stream(context, length, work)
        finally:
            source.close()

    def _result(self, outcome: LoadOutcome) -> pb.LoadResult:
        report = outcome.report
        return pb.LoadResult(
            buffers=[buffer_info(record) for record in outcome.records],
            segments=[
                pb.LoadedSegment(
                    buffer_id=record.id,
                    buffer_offset=plan.piece.buffer_offset,
                    file_offset=plan.piece.file_offset,
                    length=plan.piece.length,
                )
                for record, plan in zip(outcome.records, outcome.plans, strict=True)
            ],
            method=pb.LoadMethod.ValueType(report.method.value),
            bytes=outcome.bytes,
            wall_seconds=report.wall_seconds,
            cpu_seconds=report.cpu_seconds,
            verified=report.verified,
            parallelism=report.parallelism,
        )

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> Iterator[pb.LoadProgress]:
        session, ticket = self._serve(context, lambda session, ticket: (session, ticket))
        source = self._prepare(context, lambda: self._open_source(session, ticket, request.source))

        def plan() -> ModelLoad:
            requested = _method(request.method)
            candidates = self._broker.eligible(session, request.heap, request.usage or "model-weights")
            backend = choose_heap(candidates, requested, source)
            return ModelLoad(
                backend=backend,
                method=choose_method(backend, requested, source),
                verify=request.verify,
                largest=self._broker.largest_buffer(backend),
            )

        how = self._prepare(context, plan, source)

        def work(progress: ProgressFn, cancelled: CancelledFn) -> pb.LoadProgress:
            started = time.monotonic()
            model, shared = self._models.acquire(
                session.id, session.peer.uid, source, how, progress=progress, cancelled=cancelled
            )
            try:
                session.sender.send_fds(ticket, model.buffer_ids, model.share_fds)
            except BaseException:
                self._models.release(session.id, model.id)
                raise
            return self._model_reply(model, shared=shared, verified=how.verify, wall_seconds=time.monotonic() - started)

        try:
            yield from self._stream(context, source.size, work)
        finally:
            source.close()

    def _model_reply(
        self, model: ResidentModel, *, shared: bool, verified: bool, wall_seconds: float
    ) -> pb.LoadProgress:
        infos = [
            pb.BufferInfo(
                id=buffer_id,
                size=allocation.size,
                heap=model.key[1],
                backend=pb.Backend.ValueType(allocation.kind.value),
                kernel_name="dmabufd:model",
                usage="model-weights",
                inode=allocation.identity[1],
            )
            for buffer_id, allocation in zip(model.buffer_ids, model.allocations, strict=True)
        ]
        tensors = []
        for tensor in model.header.tensors:
            index, offset = model.placement[tensor.name]
            tensors.append(
                pb.TensorInfo(
                    name=tensor.name,
                    dtype=tensor.dtype,
                    shape=tensor.shape,
                    buffer_id=model.buffer_ids[index],
                    offset=offset,
                    nbytes=tensor.nbytes,
                )
            )
        report = model.report
        loaded = sum(plan.piece.length for plan in model.plans)
        # A shared model was not read by this call: it reports the time to
        # attach, and no bytes, so no one divides one by the other.
        result = pb.LoadResult(
            buffers=infos,
            method=pb.LoadMethod.ValueType(report.method.value),
            bytes=0 if shared else loaded,
            wall_seconds=wall_seconds if shared else report.wall_seconds,
            cpu_seconds=0.0 if shared else report.cpu_seconds,
            verified=verified or report.verified,
            parallelism=report.parallelism,
        )
        info = pb.ModelInfo(
            model_id=model.id,
            tensors=tensors,
            metadata=model.header.metadata,
            shared=shared,
            read_only_enforced=model.read_only_enforced,
        )
        return pb.LoadProgress(bytes_done=loaded, bytes_total=loaded, result=result, model=info)

    def ReleaseModel(self, request: pb.ReleaseModelRequest, context: grpc.ServicerContext) -> pb.ReleaseModelResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ReleaseModelResponse:
            if not self._models.release(session.id, request.model_id):
                raise BufferNotFound(f"this session holds no model with id {request.model_id}")
            return pb.ReleaseModelResponse()

        return self._serve(context, handle)

    # -- pools and grants ---------------------------------------------------

    @staticmethod
    def _pool_info(pool: Pool) -> pb.PoolInfo:
        image = pool.format
        return pb.PoolInfo(
            pool_id=pool.id,
            format=pb.ImageFormat(
                fourcc=image.fourcc, width=image.width, height=image.height, stride_align=image.stride_align
            ),
            planes=[
                pb.PlaneLayout(buffer_index=p.buffer_index, offset=p.offset, stride=p.stride, size=p.size)
                for p in pool.placements
            ],
            frames=[pb.PoolFrame(buffer_ids=[r.id for r in frame]) for frame in pool.frames],
            buffers=[buffer_info(record) for record in pool.records],
            frame_bytes=pool.frame_bytes,
            recycled=pool.recycled,
            allocation_seconds=pool.allocation_seconds,
        )

    def AllocatePool(self, request: pb.AllocatePoolRequest, context: grpc.ServicerContext) -> pb.PoolInfo:
        def handle(session: Session, ticket: bytes) -> pb.PoolInfo:
            image = request.format
            pool = self._pools.allocate(
                session,
                ticket,
                image=FormatKey(image.fourcc, image.width, image.height, max(1, image.stride_align)),
                count=request.count,
                buffer_per_plane=request.buffer_per_plane,
                heap=request.heap,
                usage=request.usage,
                label=request.name,
                recycle=request.recycle,
            )
            return self._pool_info(pool)

        return self._serve(context, handle)

    def ReleasePool(self, request: pb.ReleasePoolRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ReleaseResponse:
            released = self._pools.release(session, request.pool_id, owner_pid=session.peer.pid)
            return pb.ReleaseResponse(released_bytes=released)

        return self._serve(context, handle)

    def Grant(self, request: pb.GrantRequest, context: grpc.ServicerContext) -> pb.GrantResponse:
        def handle(session: Session, _ticket: bytes) -> pb.GrantResponse:
            if request.pool_id:
                records = self._pools.find(session, request.pool_id).records
            else:
                records = [self._ledger.find(session, buffer_id) for buffer_id in request.buffer_ids]
            kind = request.WhichOneof("to")
            if kind is None:
                raise InvalidRequest("say who receives the grant: a uid, or token = true")
            if kind == "uid" and not any(s.peer.uid == request.uid for s in self._sessions.sessions()):
                raise BufferNotFound(f"no client of uid {request.uid} is connected to receive the grant")
            entry = self._grants.make(
                session,
                records,
                pool_id=request.pool_id,
                to_uid=request.uid if kind == "uid" else None,
                read_only=request.read_only,
            )
            return pb.GrantResponse(grant_id=entry.id, token=entry.token.hex() if entry.token else "")

        return self._serve(context, handle)

    def Redeem(self, request: pb.RedeemRequest, context: grpc.ServicerContext) -> pb.RedeemResponse:
        def handle(session: Session, ticket: bytes) -> pb.RedeemResponse:
            entry = self._grants.take(session, token_hex=request.token, grant_id=request.grant_id)
            fds = read_only_fds(entry.records) if entry.read_only else [r.allocation.fd for r in entry.records]
            try:
                session.sender.send_fds(ticket, [r.id for r in entry.records], fds)
            finally:
                if entry.read_only:
                    for fd in fds:
                        os.close(fd)
            pool = self._pools.note_holder(entry.pool_id, session.peer.pid) if entry.pool_id else None
            return pb.RedeemResponse(
                buffers=[buffer_info(record) for record in entry.records],
                pool=self._pool_info(pool) if pool is not None else None,
                read_only=entry.read_only,
                grant_id=entry.id,
            )

        return self._serve(context, handle)

    def Revoke(self, request: pb.RevokeRequest, context: grpc.ServicerContext) -> pb.RevokeResponse:
        def handle(session: Session, _ticket: bytes) -> pb.RevokeResponse:
            self._grants.revoke(session, request.grant_id)
            return pb.RevokeResponse()

        return self._serve(context, handle)

    @staticmethod
    def _grant_info(entry: GrantEntry) -> pb.GrantInfo:
        return pb.GrantInfo(
            grant_id=entry.id,
            from_uid=entry.owner.peer.uid,
            from_pid=entry.owner.peer.pid,
            buffer_count=len(entry.records),
            bytes=entry.bytes,
            read_only=entry.read_only,
            pool_id=entry.pool_id,
        )

    def ListGrants(self, request: pb.ListGrantsRequest, context: grpc.ServicerContext) -> pb.ListGrantsResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ListGrantsResponse:
            return pb.ListGrantsResponse(
                offered=[self._grant_info(g) for g in self._grants.offered_to(session.peer.uid)],
                made=[self._grant_info(g) for g in self._grants.made_by(session)],
            )

        return self._serve(context, handle)
