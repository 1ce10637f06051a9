"""BufferService, sharing: image pools and grants between clients."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dmabufd.api.base import ServiceBase, buffer_info, never_blocks
from dmabufd.errors import BufferNotFound, InvalidRequest
from dmabufd.pools.pool import FormatKey, Pool
from dmabufd.sessions.grants import GrantEntry
from dmabufd.sessions.session import Session
from dmabufd.transport.outbox import Outgoing
from dmabufd_common.api.v1 import dmabufd_pb2 as pb

if TYPE_CHECKING:
    from dmabufd_common.api.v1.dmabufd_pb2_grpc import _ServicerContext as Context

log = logging.getLogger(__name__)


class SharingApi(ServiceBase):
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

    async def AllocatePool(self, request: pb.AllocatePoolRequest, context: Context) -> pb.PoolInfo:
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

        return await self._serve(context, handle)

    async def ReleasePool(self, request: pb.ReleasePoolRequest, context: Context) -> pb.ReleaseResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ReleaseResponse:
            released = self._pools.release(session, request.pool_id)
            return pb.ReleaseResponse(released_bytes=released)

        return await self._serve(context, handle)

    async def Grant(self, request: pb.GrantRequest, context: Context) -> pb.GrantResponse:
        def handle(session: Session, _ticket: bytes) -> pb.GrantResponse:
            if request.pool_id:
                records = self._pools.find(session, request.pool_id).records
            else:
                buffer_ids = list(request.buffer_ids)
                self._grants.check_ids(buffer_ids)
                records = [self._ledger.find(session, buffer_id) for buffer_id in buffer_ids]
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

        return await self._serve(context, handle, blocks=never_blocks)

    async def Redeem(self, request: pb.RedeemRequest, context: Context) -> pb.RedeemResponse:
        def handle(session: Session, ticket: bytes) -> pb.RedeemResponse:
            entry = self._grants.take(session, token_hex=request.token, grant_id=request.grant_id)
            try:
                for record in entry.records:
                    record.buffer.entitle(session.id)
                session.outbox.deliver(
                    ticket, [Outgoing(record.id, record.buffer, entry.read_only) for record in entry.records]
                )
            finally:
                entry.put()  # the outbox holds its own references until it has sent them
            pool = self._pools.get(entry.pool_id) if entry.pool_id else None
            return pb.RedeemResponse(
                buffers=[buffer_info(record) for record in entry.records],
                pool=self._pool_info(pool) if pool is not None else None,
                read_only=entry.read_only,
                grant_id=entry.id,
            )

        return await self._serve(context, handle, blocks=never_blocks)

    async def Revoke(self, request: pb.RevokeRequest, context: Context) -> pb.RevokeResponse:
        def handle(session: Session, _ticket: bytes) -> pb.RevokeResponse:
            self._grants.revoke(session, request.grant_id)
            return pb.RevokeResponse()

        return await self._serve(context, handle)

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

    async def ListGrants(self, request: pb.ListGrantsRequest, context: Context) -> pb.ListGrantsResponse:
        def handle(session: Session, _ticket: bytes) -> pb.ListGrantsResponse:
            return pb.ListGrantsResponse(
                offered=[self._grant_info(g) for g in self._grants.offered_to(session.peer.uid)],
                made=[self._grant_info(g) for g in self._grants.made_by(session)],
            )

        return await self._serve(context, handle, blocks=never_blocks)
