"""BufferService, loading: LoadFile, LoadModel, ReleaseModel.

A load is a stream that holds no thread while it waits: the work (open the
file, allocate, copy, book, queue the fds) runs on the load executor, and
the stream's coroutine only reports its progress and, at the end, waits for
the outbox to write the fds.

A streamed LoadModel (LoadModelRequest.stream) also passes, through a
ModelStream, the model's description once its buffers exist (their fds
queued first: the coroutine waits for the outbox to write them before it
sends the message that names them) and then the tensors that became ready,
which the coroutine sends as they come, several per message when they come
faster than it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc

from dmabufd.api.base import ServiceBase, buffer_info
from dmabufd.api.routing import route_of
from dmabufd.errors import (
    BufferNotFound,
    DeliveryFailed,
    DmabufdError,
    InvalidRequest,
    LoadCancelled,
    OutOfMemory,
    Overloaded,
)
from dmabufd.loading.loader import LoadOutcome, LoadRequest, TransferReport, choose_heap, choose_method
from dmabufd.loading.method import Method
from dmabufd.loading.models import ModelLoad, ResidentModel
from dmabufd.loading.source import SourceFile, from_client_fd, open_as_client
from dmabufd.observability import metrics
from dmabufd.sessions.session import Session
from dmabufd.transport.closer import MAX_PENDING_PER_UID, closes_hang
from dmabufd.transport.outbox import Outgoing
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

if TYPE_CHECKING:
    from dmabufd_common.api.v1.dmabufd_pb2_grpc import _ServicerContext as Context

log = logging.getLogger(__name__)

# How often a load reports progress.
PROGRESS_INTERVAL_S = 0.25


class Progress:
    """Bytes done so far, written by load threads, read by the stream; and
    whether the stream still wants the load (read by the load threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = 0
        self.total = 0
        self._abandoned = threading.Event()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    def cancelled(self) -> bool:
        return self._abandoned.is_set()

    def abandon(self) -> None:
        self._abandoned.set()


class ModelStream:
    """A streamed LoadModel between the load's threads and the stream's
    coroutine (a StreamSink for ModelCache.acquire).

    The load thread queues the buffers' fds on the outbox and leaves the
    opening message (ModelInfo); the I/O threads leave the indexes of the
    tensors that became ready; the coroutine takes both with take(). A
    wake-up is scheduled on the loop only when none is pending, so however
    fast chunks land the loop gets one call per message it sends.

    Bounds: each tensor is reported once, so at most the model's tensors
    (loading.max_tensors) wait here. Locking: _lock (a leaf) guards the
    opening, the pending indexes and the wake-up flag; the event is the
    loop's."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        session: Session,
        ticket: bytes,
        describe: Callable[[ResidentModel, bool], pb.ModelInfo],
    ) -> None:
        self._loop = loop
        self._session = session
        self._ticket = ticket
        self._describe = describe
        self._event = asyncio.Event()
        self._lock = threading.Lock()
        self._opening: pb.LoadProgress | None = None
        self._ready: list[int] = []
        self._woken = False

    @property
    def pid(self) -> int:
        return self._session.peer.pid

    # -- the load's threads ---------------------------------------------

    def opened(self, model: ResidentModel) -> None:
        self._session.outbox.deliver(
            self._ticket,
            [
                Outgoing(buffer_id, buffer, model.read_only_enforced)
                for buffer_id, buffer in zip(model.buffer_ids, model.buffers, strict=True)
            ],
        )
        opening = pb.LoadProgress(model=self._describe(model, False))
        with self._lock:
            self._opening = opening
        self._wake()

    def ready(self, indexes: list[int]) -> None:
        with self._lock:
            self._ready += indexes
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        self._loop.call_soon_threadsafe(self._event.set)

    # -- the loop ---------------------------------------------------------

    async def changed(self) -> None:
        await self._event.wait()

    def take(self) -> tuple[pb.LoadProgress | None, list[int]]:
        """(the opening message if it is new, the tensors ready since the last take)."""
        self._event.clear()
        with self._lock:
            self._woken = False
            opening, self._opening = self._opening, None
            ready, self._ready = self._ready, []
        return opening, ready


def parts_of(report: TransferReport) -> list[pb.LoadedPart]:
    """Where each part of a load's bytes came from, as the API says it."""
    return [
        pb.LoadedPart(file_offset=offset, length=length, source=pb.LoadSource.ValueType(where.value))
        for offset, length, where in report.parts
    ]


def _method(value: int) -> Method:
    try:
        return Method(value)
    except ValueError:
        raise InvalidRequest(f"unknown load method {value}") from None


# What runs on a load thread: the load itself.
Work = Callable[[Session, bytes, Progress, ModelStream | None], pb.LoadProgress]

# A load's system calls fail for the file's sake (EIO from the device, a
# special file that refuses reads) or for memory's: either is the client's
# to know, named, not an internal error.
_OUT_OF_MEMORY = (errno.ENOMEM, errno.ENOSPC, errno.EDQUOT)


def _reads_explained(work: Work) -> Work:
    """`work`, with an OSError it raises turned into the status it means."""

    def explained(session: Session, ticket: bytes, progress: Progress, stream: ModelStream | None) -> pb.LoadProgress:
        try:
            return work(session, ticket, progress, stream)
        except OSError as error:
            code = error.errno or errno.EIO
            what = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
            if code in _OUT_OF_MEMORY:
                raise OutOfMemory(f"the load ran out of memory: {what}") from None
            raise InvalidRequest(f"reading the file failed: {what}; it cannot be loaded as it is") from None

    return explained


class LoadingApi(ServiceBase):
    def _open_source(self, session: Session, ticket: bytes, source: pb.FileSource) -> SourceFile:
        """The file a load names: the fd sent with the call's ticket, or a
        path opened with the client's credentials. Runs on a load worker."""
        kind = source.WhichOneof("source")
        deposited = self._sessions.take_file(session, ticket)
        closing = self._closer.pending(session.peer.uid)
        if closing >= MAX_PENDING_PER_UID:  # each load leaves files to close: not while they hang
            if deposited is not None:
                self._closer.close(session.peer.uid, [deposited])
            raise Overloaded(closes_hang(session.peer.uid, closing))
        if kind == "path":
            if deposited is not None:
                self._closer.close(session.peer.uid, [deposited])
            return open_as_client(source.path, session.peer, self._loading.roots, self._closer)
        if deposited is None:
            raise InvalidRequest("no file: send its fd in a FILE frame with the call's ticket, or name a path")
        return from_client_fd(deposited, session.peer, self._closer)

    async def _undo_in_turn(self, undo: Callable[[Session], None], session: Session) -> None:
        try:
            async with self._limits.thread(session.peer.uid):
                await asyncio.get_running_loop().run_in_executor(self._executors.calls, undo, session)
        except RuntimeError:  # the daemon is stopping: the session's end releases its models
            log.debug("session %d: a cancelled load's model is left to the session's end", session.id)
        except Exception:
            log.exception("session %d: letting go of a cancelled load's model failed", session.id)

    async def _stream(
        self,
        context: Context,
        work: Work,
        *,
        stream_model: bool = False,
        undo: Callable[[Session], None] | None = None,
    ) -> AsyncIterator[pb.LoadProgress]:
        """Claim the call (a call slot, then one of the uid's load slots),
        run `work` on the load executor and stream its progress until it
        ends. A client that cancels (or whose deadline passes) stops the
        load; the stream never ends before the work does (the work owns the
        file and its buffers until it returns). With `stream_model` the work
        gets a ModelStream, whose messages go out as they come. `undo` runs
        once the work is over if the call ends before its result went out
        (the work may have completed as the client cancelled)."""
        try:
            session, ticket_hex = self._session_of(context)
            with self._call_slot(session, ticket_hex):
                ticket = await self._sessions.take_ticket(session, ticket_hex)
                opened = False
                answered = False
                pending: ModelStream | None = None
                try:
                    async with self._limits.load(session.peer.uid):
                        progress = Progress()
                        loop = asyncio.get_running_loop()
                        if stream_model:
                            pending = ModelStream(loop, session, ticket, self._describe)
                        future = loop.run_in_executor(
                            self._executors.loads, _reads_explained(work), session, ticket, progress, pending
                        )
                        try:
                            reported = -1
                            while True:
                                waits: set[asyncio.Future[Any]] = {future}
                                woken = asyncio.ensure_future(pending.changed()) if pending is not None else None
                                if woken is not None:
                                    waits.add(woken)
                                try:
                                    done, _ = await asyncio.wait(
                                        waits, timeout=PROGRESS_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED
                                    )
                                finally:
                                    if woken is not None:
                                        woken.cancel()
                                if future.done():
                                    break
                                message = None
                                if pending is not None:
                                    message, opened = await self._model_message(session, ticket, pending, opened)
                                if message is None:
                                    # Bytes alone are worth a message once an interval, not at every wake-up.
                                    if done or progress.done == reported:
                                        continue
                                    message = pb.LoadProgress()
                                reported = progress.done
                                message.bytes_done, message.bytes_total = reported, progress.total
                                yield message
                        finally:
                            progress.abandon()  # cancelled, or the client went away mid-stream
                            with contextlib.suppress(BaseException):
                                await asyncio.shield(future)
                    try:
                        result = future.result()
                    except BaseException:
                        session.outbox.forget(ticket)
                        raise
                    await session.outbox.flushed(ticket)
                    if pending is not None:
                        # A load that ended before its opening message went out
                        # sends it now, as part of the last one.
                        opening, ready = pending.take()
                        if opening is not None and not opened:
                            result.model.CopyFrom(opening.model)
                        result.tensors_ready.extend(ready)
                    answered = True
                finally:
                    # The file sent with the ticket, if the work never took
                    # it (it failed first, or never ran: cancelled in the queue).
                    self._sessions.drop_file(session, ticket)
                    if not answered and undo is not None:
                        # Off the loop (letting go of a model reads /proc),
                        # within the uid's share of the threads.
                        task = asyncio.get_running_loop().create_task(self._undo_in_turn(undo, session))
                        self._frame_tasks.add(task)
                        task.add_done_callback(self._frame_tasks.discard)
            yield result
        except DmabufdError as error:
            if not isinstance(error, LoadCancelled):
                log.info("load failed: %s (%s)", error, error.status.name)
            await self._abort(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
            raise
        except Exception:
            await self._internal(context)

    @staticmethod
    async def _model_message(
        session: Session, ticket: bytes, stream: ModelStream, opened: bool
    ) -> tuple[pb.LoadProgress | None, bool]:
        """The next message of a streamed model, if there is one, and
        whether its opening message has gone out. The opening waits until
        the outbox has written the fds it names."""
        opening, ready = stream.take()
        if opening is not None:
            await session.outbox.flushed(ticket)
            opening.tensors_ready.extend(ready)
            return opening, True
        if not ready:
            return None, opened
        # The load reports ready tensors only after its opening.
        assert opened, "tensors ready before the model was described"
        return pb.LoadProgress(tensors_ready=ready), opened

    async def LoadFile(self, request: pb.LoadFileRequest, context: Context) -> AsyncIterator[pb.LoadProgress]:
        def work(session: Session, ticket: bytes, progress: Progress, _stream: ModelStream | None) -> pb.LoadProgress:
            method = _method(request.method)
            usage, npu_device = route_of(request)
            source = self._open_source(session, ticket, request.source)
            try:
                offset, length = source.check_range(request.source.offset, request.source.length)
                progress.total = length
                load = LoadRequest(
                    offset=offset,
                    length=length,
                    heap=request.heap,
                    usage=usage,
                    label=request.name,
                    method=method,
                    verify=request.verify,
                    max_buffer_bytes=request.max_buffer_bytes,
                    npu_device=npu_device,
                )
                outcome = self._loader.load(
                    session, ticket, source, load, progress=progress.add, cancelled=progress.cancelled
                )
            finally:
                source.close()
            metrics.count_load(outcome.report.method.label, outcome.bytes, outcome.report.wall_seconds)
            return pb.LoadProgress(bytes_done=length, bytes_total=length, result=self._result(outcome))

        async for message in self._stream(context, work):
            yield message

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
            parts=parts_of(report),
            bytes_from_cache=report.bytes_from_cache,
            prepared_bytes=report.prepared_bytes,
        )

    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> AsyncIterator[pb.LoadProgress]:
        held: list[int] = []  # the model this call holds, once the work is done

        def work(session: Session, ticket: bytes, progress: Progress, stream: ModelStream | None) -> pb.LoadProgress:
            started = time.monotonic()
            requested = _method(request.method)
            usage, npu_device = route_of(request, default_usage="model-weights")
            source = self._open_source(session, ticket, request.source)
            try:
                progress.total = source.size
                candidates = self._broker.eligible(session, request.heap, usage, npu_device)
                backend = choose_heap(candidates, requested, source)
                how = ModelLoad(
                    backend=backend,
                    method=choose_method(backend, requested, source),
                    method_chosen=requested is Method.AUTO,
                    verify=request.verify,
                    largest=self._broker.largest_buffer(backend),
                    max_buffers=self._broker.max_batch,
                )
                model, shared = self._models.acquire(
                    session.id,
                    session.peer.uid,
                    session.peer.pid,
                    source,
                    how,
                    progress=progress.add,
                    cancelled=progress.cancelled,
                    stream=stream,
                )
            finally:
                source.close()
            streamed = stream is not None and not shared
            try:
                if streamed:
                    # Its fds went out with the opening message. A session
                    # that ended meanwhile has had its models released
                    # already: this one, published since, must not stay held.
                    if session.closed:
                        raise DeliveryFailed("the session ended during the load")
                else:
                    session.outbox.deliver(
                        ticket,
                        [
                            Outgoing(buffer_id, buffer, model.read_only_enforced)
                            for buffer_id, buffer in zip(model.buffer_ids, model.buffers, strict=True)
                        ],
                    )
            except BaseException:
                self._models.release(session.id, session.peer.uid, session.peer.pid, model.id)
                raise
            if not shared:  # this call read the file
                report = self._report_of(model)
                loaded = sum(plan.piece.length for plan in model.plans)
                metrics.count_load(report.method.label, loaded, report.wall_seconds)
            reply = self._model_reply(
                model,
                shared=shared,
                verified=how.verify,
                wall_seconds=time.monotonic() - started,
                described=not streamed,
            )
            held.append(model.id)
            return reply

        def undo(session: Session) -> None:
            # The client never learns the model's id: nothing would release
            # it before the session ends, and the uid would pay for it.
            for model_id in held:
                self._models.release(session.id, session.peer.uid, session.peer.pid, model_id)

        async for message in self._stream(context, work, stream_model=request.stream, undo=undo):
            yield message

    @staticmethod
    def _report_of(model: ResidentModel) -> TransferReport:
        report = model.report
        if report is None:  # pragma: no cover - published models are loaded
            raise RuntimeError(f"model {model.id} has no transfer report")
        return report

    @staticmethod
    def _describe(model: ResidentModel, shared: bool) -> pb.ModelInfo:
        info = pb.ModelInfo(
            model_id=model.id,
            metadata=model.header.metadata,
            shared=shared,
            read_only_enforced=model.read_only_enforced,
        )
        for tensor in model.header.tensors:
            # A zero-size tensor of a model with no bytes at all has no buffer.
            placed = model.placement.get(tensor.name)
            info.tensors.add(
                name=tensor.name,
                dtype=tensor.dtype,
                shape=tensor.shape,
                buffer_id=model.buffer_ids[placed[0]] if placed else 0,
                offset=placed[1] if placed else 0,
                nbytes=tensor.nbytes,
            )
        return info

    def _model_reply(
        self, model: ResidentModel, *, shared: bool, verified: bool, wall_seconds: float, described: bool
    ) -> pb.LoadProgress:
        """The last message of a LoadModel call; `described`: with the
        ModelInfo (a streamed load sent it first)."""
        infos = [
            pb.BufferInfo(
                id=buffer_id,
                size=buffer.size,
                heap=model.key[1],
                backend=pb.Backend.ValueType(buffer.kind.value),
                kernel_name="dmabufd:model",
                usage="model-weights",
                inode=buffer.identity[1],
            )
            for buffer_id, buffer in zip(model.buffer_ids, model.buffers, strict=True)
        ]
        report = self._report_of(model)
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
            # Shared: the whole model was usable once attached.
            first_tensor_seconds=wall_seconds if shared else model.first_tensor_seconds,
            prepared_bytes=0 if shared else report.prepared_bytes,
        )
        reply = pb.LoadProgress(bytes_done=loaded, bytes_total=loaded, result=result)
        if described:
            reply.model.CopyFrom(self._describe(model, shared))
        return reply

    async def ReleaseModel(self, request: pb.ReleaseModelRequest, context: Context) -> pb.ReleaseModelResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ReleaseModelResponse:
            if not self._models.release(session.id, session.peer.uid, session.peer.pid, request.model_id):
                raise BufferNotFound(f"this session holds no model with id {request.model_id}")
            return pb.ReleaseModelResponse()

        return await self._serve(context, handle)
