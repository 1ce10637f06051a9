"""BufferService, buffers: heaps, allocation, release, listing, stats."""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator

import grpc

from dmabufd.api.base import ServiceBase, buffer_info
from dmabufd.heaps.backend import PAGE_SIZE, HeapSpec
from dmabufd.heaps.registry import HeapEventKind
from dmabufd.sessions import procfs
from dmabufd.sessions.session import Session
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

log = logging.getLogger(__name__)

# How often a WatchHeaps stream checks that its client is still there.
WATCH_POLL_S = 0.5
_EVENT_KINDS = {HeapEventKind.ADDED: pb.HeapEvent.KIND_ADDED, HeapEventKind.REMOVED: pb.HeapEvent.KIND_REMOVED}


class BuffersApi(ServiceBase):
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
        stats.sessions_opened, stats.sessions_closed = self._sessions.opened, self._sessions.closed
        stats.models, stats.model_bytes = self._models.resident()
        return stats
