"""BufferService, buffers: heaps, allocation, release, listing, stats."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from dmabufd.api.base import ServiceBase, buffer_info, never_blocks
from dmabufd.api.routing import route_of
from dmabufd.errors import DmabufdError, InvalidRequest, Overloaded
from dmabufd.heaps.backend import PAGE_SIZE, BackendKind, HeapBackend, HeapSpec
from dmabufd.heaps.buffer import frees_quickly, put_all
from dmabufd.heaps.registry import Caller, HeapEvent, HeapEventKind
from dmabufd.sessions import procfs
from dmabufd.sessions.ledger import Released
from dmabufd.sessions.session import Session
from dmabufd_common import fdwire
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from dmabufd_common.api.v1.dmabufd_pb2_grpc import _ServicerContext as Context


def _frame_request(frame: fdwire.AllocateFrame) -> pb.AllocateRequest:
    """The AllocateRequest an ALLOCATE frame holds: one buffer's."""
    request = pb.AllocateRequest()
    try:
        request.ParseFromString(frame.request)
    except DecodeError:
        raise InvalidRequest("the ALLOCATE frame does not hold an AllocateRequest") from None
    if request.count > 1:
        raise InvalidRequest(
            f"an ALLOCATE frame asks for one buffer, not {request.count}: use the Allocate call for batches"
        )
    return request


# How often a WatchHeaps stream checks that its session is still there.
WATCH_POLL_S = 1.0
WATCH_BACKLOG = 256
_EVENT_KINDS = {HeapEventKind.ADDED: pb.HeapEvent.KIND_ADDED, HeapEventKind.REMOVED: pb.HeapEvent.KIND_REMOVED}
# A caller without a session (ListHeaps from a generic tool): matched by no
# access rule (configured ids are never negative), so a heap is `allowed`
# to it only when it has no heaps.access entry, that is when every client
# the daemon admits may allocate from it.
ANYONE = Caller(uid=-1, gids=frozenset())


class BuffersApi(ServiceBase):
    def _heap(self, spec: HeapSpec, session: Session | None) -> pb.Heap:
        heap = pb.Heap(
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
            allowed=self._registry.allowed(spec.name, self._broker.caller(session) if session else ANYONE),
        )
        reserve = self._registry.reserve
        if spec.kind is BackendKind.MEMFD and reserve is not None and reserve.sizes:
            heap.reserve_bytes = sum(reserve.sizes)
            # How much is ready changes when anyone loads: for admins only,
            # as other clients' activity is not a client's to watch.
            if session is not None and self._is_admin(session):
                heap.reserve_ready_bytes = reserve.ready_bytes
        return heap

    # -- methods --------------------------------------------------------

    async def ListHeaps(self, request: pb.ListHeapsRequest, context: Context) -> pb.ListHeapsResponse:
        """Public (see _serve_public): with a session, `allowed` is the
        caller's; without one, whether every admitted client may allocate."""

        def handle(session: Session | None) -> pb.ListHeapsResponse:
            routes = [
                pb.UsageRoute(usage=usage, heap_order=order)
                for usage, order in sorted(self._registry.usage_routes().items())
            ]
            heaps = [self._heap(spec, session) for spec in self._registry.specs()]
            npu_routes = [
                pb.NpuRoute(
                    buffer_type=pb.NpuBufferType.ValueType(route.buffer_type),
                    npu_device=route.npu_device,
                    usage=route.usage,
                    heap_order=route.heap_order,
                )
                for route in self._registry.npu_routes()
            ]
            source = self._registry.dma_heap_json
            return pb.ListHeapsResponse(
                heaps=heaps,
                usage_routes=routes,
                npu_routes=npu_routes,
                dma_heap_json=str(source) if source is not None else "",
            )

        return await self._serve_public(context, handle)

    async def WatchHeaps(self, request: pb.WatchHeapsRequest, context: Context) -> AsyncIterator[pb.HeapEvent]:
        """A stream holds no thread: it waits on the loop for events the
        registry queues (WATCH_BACKLOG at most; a client that reads slower
        than heaps change loses its stream, not the daemon's memory)."""
        try:
            session, ticket_hex = self._session_of(context)
            with self._call_slot(session, ticket_hex):
                await self._sessions.take_ticket(session, ticket_hex)
        except DmabufdError as error:
            await self._abort(context, error)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[HeapEvent | None] = asyncio.Queue(maxsize=WATCH_BACKLOG)
        overflowed = asyncio.Event()

        def put(event: HeapEvent | None) -> None:
            try:
                events.put_nowait(event)
            except asyncio.QueueFull:
                overflowed.set()

        def sink(event: HeapEvent | None) -> None:  # the registry's thread, its lock held
            loop.call_soon_threadsafe(put, event)

        try:
            with self._limits.watch(session.peer.uid), self._registry.watch(sink) as present:
                if request.include_existing:
                    for spec in present:
                        yield pb.HeapEvent(kind=pb.HeapEvent.KIND_ADDED, heap=self._heap(spec, session))
                    yield pb.HeapEvent(kind=pb.HeapEvent.KIND_SYNCED)
                while not session.closed:
                    if overflowed.is_set():
                        raise Overloaded(f"more than {WATCH_BACKLOG} heap events unread; watch again")
                    try:
                        event = await asyncio.wait_for(events.get(), WATCH_POLL_S)
                    except TimeoutError:
                        continue
                    if event is None:
                        return
                    yield pb.HeapEvent(kind=_EVENT_KINDS[event.kind], heap=self._heap(event.spec, session))
        except DmabufdError as error:
            await self._abort(context, error)

    def _target(self, session: Session, request: pb.AllocateRequest) -> tuple[str, HeapBackend]:
        """The request's usage and the backend it allocates from."""
        usage, npu_device = route_of(request)
        return usage, self._broker.pick(session, request.heap, usage, npu_device)

    def _allocate(
        self, session: Session, ticket: bytes, request: pb.AllocateRequest, usage: str, backend: HeapBackend
    ) -> pb.AllocateResponse:
        records = self._broker.allocate(
            session,
            ticket,
            backend=backend,
            size=request.size,
            count=request.count or 1,
            usage=usage,
            label=request.name,
        )
        return pb.AllocateResponse(buffers=[buffer_info(record) for record in records])

    def _allocation_blocks(self, session: Session, request: pb.AllocateRequest) -> bool:
        try:
            _, backend = self._target(session, request)
        except DmabufdError:
            return False  # the handler fails as fast
        return not self._broker.never_blocks(backend, request.count or 1)

    async def Allocate(self, request: pb.AllocateRequest, context: Context) -> pb.AllocateResponse:
        def handle(session: Session, ticket: bytes) -> pb.AllocateResponse:
            return self._allocate(session, ticket, request, *self._target(session, request))

        return await self._serve(context, handle, blocks=lambda session: self._allocation_blocks(session, request))

    def serve_frame(self, session: Session, frame: fdwire.AllocateFrame) -> None:
        """An ALLOCATE frame, read on the loop, answered by a REPLY that
        carries the buffer's fd: right away for a memfd (a few microsecond
        syscalls), by a task whose handler runs on the `calls` executor for
        a device heap. Either takes one of the uid's call slots, as a gRPC
        call does; a refused one costs a REPLY, and unread REPLYs count
        against the outbox. For a memfd the heap is resolved once, here."""
        try:
            request = _frame_request(frame)
            usage, backend = self._target(session, request)
        except DmabufdError as error:
            refused = error

            def refuse(_session: Session, _ticket: bytes) -> pb.AllocateResponse:
                raise refused

            self._answer_frame(session, frame.ticket, refuse)
            return

        inline = self._broker.never_blocks(backend, 1)

        def handle(session: Session, ticket: bytes) -> pb.AllocateResponse:
            # A device heap's handler runs after a wait the uid controls (its
            # thread turn); the heap may have gone meanwhile: resolve again.
            target = (usage, backend) if inline else self._target(session, request)
            response = self._allocate(session, ticket, request, *target)
            if response.ByteSize() > fdwire.MAX_REPLY_BODY_BYTES:  # names the config made too long
                # Never sent, so no process holds them: no /proc check.
                released = self._ledger.release_begin(session, [info.id for info in response.buffers])
                self._ledger.release_end(released, frozenset())
                raise InvalidRequest("the answer does not fit in a REPLY frame: use the Allocate call")
            return response

        if inline:
            self._answer_frame(session, frame.ticket, handle)
            return
        task = asyncio.get_running_loop().create_task(self._answer_frame_later(session, frame.ticket, handle))
        self._frame_tasks.add(task)
        task.add_done_callback(self._frame_tasks.discard)

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        """Served on the loop: the books change at once, a helper process
        answers which buffers the client's processes still hold
        (sessions/holders.py), and no thread is involved unless the
        buffers' pages take long to free."""

        def begin(session: Session, _ticket: bytes) -> asyncio.Task[int]:
            return self._settle(self._ledger.release_begin(session, list(request.buffer_ids)))

        settling = await self._serve(context, begin, blocks=never_blocks)
        try:
            return pb.ReleaseResponse(released_bytes=await asyncio.shield(settling))
        except Exception:
            await self._internal(context)

    def _settle(self, released: Released) -> asyncio.Task[int]:
        """Finish a release begun on the loop, in a task started as the
        books change: nothing the call does afterwards (its answer, its
        cancellation) can strand the charge of buffers that left them."""
        task = asyncio.get_running_loop().create_task(self._settle_now(released))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _settle_now(self, released: Released) -> int:
        """Ask, settle, and let go of what nobody holds; returns the bytes."""
        try:
            held = await self._holders.held(released.uid, released.query)
        except Exception:  # a bug: the charges stay, and the reaper looks again
            log.exception("the /proc check of a release failed")
            held = frozenset(released.query.wanted)
        nbytes, gone = self._ledger.release_end(released, held, keep=True)
        buffers = [record.buffer for record in gone]
        if frees_quickly(buffers):
            put_all(buffers)
        else:  # the executor outlives this task: stop awaits it first (finish_frames)
            async with self._limits.thread(released.uid):
                await asyncio.get_running_loop().run_in_executor(self._executors.calls, put_all, buffers)
        return nbytes

    async def ListBuffers(self, request: pb.ListBuffersRequest, context: Context) -> pb.ListBuffersResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ListBuffersResponse:
            records = self._ledger.session_buffers(session.id)
            return pb.ListBuffersResponse(buffers=[buffer_info(record) for record in records])

        return await self._serve(context, handle, blocks=never_blocks)

    async def DescribeBuffer(self, request: pb.DescribeBufferRequest, context: Context) -> pb.BufferInfo:
        return await self._serve(
            context, lambda session, _: buffer_info(self._ledger.find(session, request.buffer_id)), blocks=never_blocks
        )

    async def GetStats(self, request: pb.GetStatsRequest, context: Context) -> pb.Stats:
        return await self._serve(context, lambda session, _: self._stats(session, request.check_proc))

    def _stats(self, caller: Session, check_proc: bool) -> pb.Stats:
        admins = self._is_admin(caller)
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
            charged = self._ledger.usage_of(session.peer.uid)
            client.charged_bytes, client.charged_buffers = charged.bytes, charged.buffers
            if check_proc:
                try:
                    holdings = procfs.open_files(session.peer.pid, (r.identity for r in held))
                except OSError:  # the daemon is out of fds: say it could not look
                    holdings = procfs.ProcHoldings(False, frozenset())
                seen = [record for record in held if record.identity in holdings.files]
                client.proc_checked = holdings.readable
                client.proc_buffer_count = len(seen)
                client.proc_bytes = sum(record.size for record in seen)
                dmabufs = procfs.dmabufs_of(session.peer.pid)
                client.proc_dmabuf_count, client.proc_dmabuf_bytes = dmabufs.count, dmabufs.bytes
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
        stats.lingering_buffers = totals.lingering
        stats.sessions_opened, stats.sessions_closed = self._sessions.opened, self._sessions.closed
        stats.models, stats.model_bytes = self._models.resident()
        return stats
