"""What every part of the BufferService shares: its collaborators, and
how a call claims its session and turns a DmabufdError into its status.

Each method claims the caller's session (token + ticket, see
sessions/session.py), calls into the daemon, and reports a DmabufdError as
the call's status. Anything else is a bug: it is logged with its traceback
and reported as INTERNAL, and the daemon serves on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, TypeVar

import grpc

from dmabufd.broker import BufferBroker
from dmabufd.config import AccessRule, LoadingConfig
from dmabufd.errors import DmabufdError
from dmabufd.heaps.registry import HeapRegistry
from dmabufd.loading.loader import (
    FileLoader,
)
from dmabufd.loading.models import ModelCache
from dmabufd.pools.pool import PoolTable
from dmabufd.sessions.grants import GrantTable
from dmabufd.sessions.ledger import BufferRecord, Ledger
from dmabufd.sessions.session import Session, SessionTable
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc
from dmabufd_common.fdwire import SESSION_METADATA_KEY, TICKET_METADATA_KEY

log = logging.getLogger(__name__)
T = TypeVar("T")


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


class ServiceBase(pb_grpc.BufferServiceServicer):
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
