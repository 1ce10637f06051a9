"""BufferService, loading: LoadFile, LoadModel, ReleaseModel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from dmabufd.api.base import ServiceBase, buffer_info
from dmabufd.errors import BufferNotFound, DmabufdError, InvalidRequest
from dmabufd.loading.loader import (
    CancelledFn,
    LoadOutcome,
    LoadRequest,
    ProgressFn,
    choose_heap,
    choose_method,
)
from dmabufd.loading.method import Method
from dmabufd.loading.models import ModelLoad, ResidentModel
from dmabufd.loading.source import SourceFile, close_quietly, from_client_fd, open_as_client
from dmabufd.sessions.session import Session
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

log = logging.getLogger(__name__)

# How often a load reports progress (and notices a cancelled call).
PROGRESS_INTERVAL_S = 0.25
T = TypeVar("T")


def _method(value: int) -> Method:
    try:
        return Method(value)
    except ValueError:
        raise InvalidRequest(f"unknown load method {value}") from None


class LoadingApi(ServiceBase):
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
