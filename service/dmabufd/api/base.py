"""What every part of the BufferService shares: its collaborators, and
how a call claims its session and turns a DmabufdError into its status.

A call runs in three steps (service/dmabufd/CONCURRENCY.md has the whole
picture):
1. On the event loop: find the session by its token, take one of the
   uid's call slots (limits), and wait for the call's ticket. Waiting holds
   no thread.
2. On the `calls` executor: the handler, a plain function that may block
   (allocation ioctls, /proc reads, closing fds). It queues fds on the
   session's outbox; it never writes to a socket.
3. On the event loop again: wait until the outbox has written this call's
   fds, then answer. A client that does not read its socket makes only its
   own call wait, and loses its session after limits.outbox_stall_s.

A DmabufdError becomes the call's status, in the rich error model: the
code and message, and in the `grpc-status-details-bin` trailer a
google.rpc.Status whose ErrorInfo names the error's reason (domain
dmabufd_common.reasons.DOMAIN), with a QuotaFailure for quota denials
(status_of). Anything else is a bug: logged with its traceback and
reported as INTERNAL, and the daemon serves on.

Read-only introspection (ListHeaps) is also public: a call without session
metadata, from a generic tool such as grpcurl, is answered by
_serve_public at once on the loop, with no session, ticket or uid; nothing
that hands out an fd is served that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn, Protocol, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from dmabufd.broker import BufferBroker
from dmabufd.config import AccessRule, LoadingConfig
from dmabufd.errors import DeliveryFailed, DmabufdError, Overloaded, QuotaExceeded
from dmabufd.heaps.registry import HeapRegistry
from dmabufd.loading.loader import FileLoader
from dmabufd.loading.models import ModelCache
from dmabufd.observability import metrics
from dmabufd.pools.pool import PoolTable
from dmabufd.sessions.grants import GrantTable
from dmabufd.sessions.holders import HolderChecks
from dmabufd.sessions.ledger import BufferRecord, Ledger
from dmabufd.sessions.limits import UidLimits
from dmabufd.sessions.session import Session, SessionTable
from dmabufd.transport.closer import Closer
from dmabufd_common import fdwire
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc
from dmabufd_common.fdwire import SESSION_METADATA_KEY, TICKET_METADATA_KEY
from dmabufd_common.reasons import DOMAIN, QUOTA_SUBJECT_PREFIX, Reason

log = logging.getLogger(__name__)
T = TypeVar("T")
INTERNAL_MESSAGE = "internal error in dmabufd; see the daemon's log"


def buffer_info(record: BufferRecord) -> pb.BufferInfo:
    return pb.BufferInfo(
        id=record.id,
        size=record.size,
        heap=record.heap,
        backend=pb.Backend.ValueType(record.kind.value),
        kernel_name=record.kernel_name,
        usage=record.usage,
        created_at=record.created_at,
        inode=record.identity[1],
    )


@dataclass(frozen=True)
class Executors:
    """Where blocking work runs: short calls, and loads (long, bounded apart
    so a slow load never delays an allocation)."""

    calls: Executor
    loads: Executor


class Claimed:
    """A call's session and ticket, once claimed."""

    __slots__ = ("session", "ticket")

    def __init__(self, session: Session, ticket: bytes) -> None:
        self.session = session
        self.ticket = ticket


def never_blocks(_session: Session) -> bool:
    return False


def status_of(
    code: grpc.StatusCode, message: str, reason: Reason | None, uid: int | None, metadata: dict[str, str] | None = None
) -> status_pb2.Status:
    """A failed call's google.rpc.Status: an ErrorInfo with `reason` (none
    without one) whose metadata adds `uid` when given, and for a quota
    denial a QuotaFailure whose violation's subject names the uid."""
    status = status_pb2.Status(code=code.value[0], message=message)
    if reason is None:
        return status
    info = error_details_pb2.ErrorInfo(reason=reason.value, domain=DOMAIN, metadata=metadata or {})
    if uid is not None:
        info.metadata["uid"] = str(uid)
    packed = any_pb2.Any()
    packed.Pack(info)
    status.details.append(packed)
    if reason is Reason.QUOTA_EXCEEDED:
        subject = f"{QUOTA_SUBJECT_PREFIX}{uid if uid is not None else 'unknown'}"
        failure = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        status.details.append(packed)
    return status


# What an ALLOCATE is answered with when its buffer was released (by
# another thread of the client) before the REPLY carrying its fd went out.
_RELEASED_MEANWHILE = status_of(
    grpc.StatusCode.NOT_FOUND,
    "the buffer was released before its fd could be sent",
    Reason.BUFFER_NOT_FOUND,
    None,
)
_RELEASED_MEANWHILE_BODY = _RELEASED_MEANWHILE.SerializeToString()


class _AbortsWithStatus(Protocol):
    """grpc.aio's ServicerContext.abort_with_status (missing from grpc-stubs)."""

    async def abort_with_status(self, status: grpc.Status) -> NoReturn: ...


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
        limits: UidLimits,
        executors: Executors,
        closer: Closer,
        holders: HolderChecks,
    ) -> None:
        self._pools = pools
        self._holders = holders
        self._closer = closer
        self._grants = grants
        self._admins = admins
        self._loader = loader
        self._models = models
        self._loading = loading
        self._sessions = sessions
        self._registry = registry
        self._ledger = ledger
        self._broker = broker
        self._limits = limits
        self._executors = executors
        # Loop only: the ALLOCATE frames being served, and the releases
        # being settled (buffers.py).
        self._frame_tasks: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[int]] = set()

    async def finish_frames(self) -> None:
        """At stop, once the sessions have ended: cancel the frames left,
        and let the releases being settled finish (each check has
        holders.CHECK_TIMEOUT_S)."""
        for task in list(self._frame_tasks):
            task.cancel()
        await asyncio.gather(*self._frame_tasks, *self._settling, return_exceptions=True)

    # -- plumbing -------------------------------------------------------

    def _is_admin(self, session: Session) -> bool:
        """Whether the session's peer is one of clients.admin_uids/admin_gids."""
        return self._admins.allows(session.peer.uid, session.peer.gids)

    def _failure(self, error: DmabufdError, uid: int | None) -> status_pb2.Status:
        """Count a failed call and build its status. Only a quota denial
        names the uid: it comes from a handler, so the caller proved its
        session. Earlier errors may come from a leaked token, whose owner's
        uid is none of the caller's business."""
        if error.status in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            self._ledger.count_denial()
        uid = uid if isinstance(error, QuotaExceeded) else None
        metrics.count_error(error.reason or "UNSPECIFIED", error.status, uid)
        return status_of(error.status, str(error), error.reason, uid, error.metadata)

    @staticmethod
    def _internal_failure() -> status_pb2.Status:
        log.exception("internal error")
        metrics.count_error(Reason.INTERNAL, grpc.StatusCode.INTERNAL, None)
        return status_of(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, Reason.INTERNAL, None)

    async def _abort(self, context: grpc.aio.ServicerContext[object, object], error: DmabufdError) -> NoReturn:
        uid = self._caller_uid(context) if isinstance(error, QuotaExceeded) else None
        status = self._failure(error, uid)
        await cast(_AbortsWithStatus, context).abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    async def _internal(self, context: grpc.aio.ServicerContext[object, object]) -> NoReturn:
        status = self._internal_failure()
        await cast(_AbortsWithStatus, context).abort_with_status(rpc_status.to_status(status))
        raise AssertionError("abort returned")  # pragma: no cover

    def _caller_uid(self, context: grpc.aio.ServicerContext[object, object]) -> int | None:
        """The uid of the session the call names, if it names a live one
        (which the call may not have proven yet: see _abort)."""
        try:
            session, _ = self._session_of(context)
        except DmabufdError:
            return None
        return session.peer.uid

    @staticmethod
    def _names_session(context: grpc.aio.ServicerContext[object, object]) -> bool:
        return any(key == SESSION_METADATA_KEY for key, _ in context.invocation_metadata() or ())

    def _session_of(self, context: grpc.aio.ServicerContext[object, object]) -> tuple[Session, str | None]:
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        session = self._sessions.session_for(metadata.get(SESSION_METADATA_KEY))
        return session, metadata.get(TICKET_METADATA_KEY)

    async def _run(self, executor: Executor | None, handler: Callable[[Session, bytes], T], claimed: Claimed) -> T:
        """Run `handler` on `executor`, or right here on the loop (None)."""
        loop = asyncio.get_running_loop()
        session, ticket = claimed.session, claimed.ticket
        try:
            if executor is None:
                result = handler(session, ticket)
            else:
                async with self._limits.thread(session.peer.uid):
                    result = await loop.run_in_executor(executor, handler, session, ticket)
        except BaseException:
            session.outbox.forget(ticket)
            raise
        finally:
            # A file sent with the ticket of a call that did not load it.
            self._sessions.drop_file(session, ticket)
        await session.outbox.flushed(ticket)
        return result

    @contextmanager
    def _call_slot(self, session: Session, ticket_hex: str | None) -> Iterator[None]:
        """One of the uid's call slots for the call; a call refused for want
        of one still consumes its ticket, so refusals cannot pile tickets up."""
        slot = self._limits.call(session.peer.uid)
        try:
            slot.__enter__()
        except Overloaded:
            self._sessions.discard_ticket(session, ticket_hex)
            raise
        try:
            yield
        finally:
            slot.__exit__(None, None, None)

    async def _serve(
        self,
        context: grpc.aio.ServicerContext[object, object],
        handler: Callable[[Session, bytes], T],
        *,
        blocks: Callable[[Session], bool] = lambda _session: True,
    ) -> T:
        """Claim the call's session (within the uid's call limit), run
        `handler`, answer once its fds are sent. The handler runs on the
        calls executor unless `blocks(session)` says it cannot block: then
        on the loop, saving two thread hand-offs (only bookkeeping and a
        few microsecond syscalls, such as memfd_create, qualify)."""
        try:
            session, ticket_hex = self._session_of(context)
            with self._call_slot(session, ticket_hex):
                ticket = await self._sessions.take_ticket(session, ticket_hex)
                executor = self._executors.calls if blocks(session) else None
                return await self._run(executor, handler, Claimed(session, ticket))
        except DmabufdError as error:
            await self._abort(context, error)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            await self._internal(context)

    def _answer_frame(self, session: Session, ticket: bytes, handler: Callable[[Session, bytes], Message]) -> None:
        """Serve a request read from the session's own fd socket (an
        ALLOCATE frame) right here on the loop: _serve's steps without
        gRPC, for a handler that cannot block. There is no token or ticket
        to check, the socket being the session's; the call slot and the
        handler are the same. The REPLY carries the buffers' fds."""
        session.outbox.park(ticket)
        try:
            with self._limits.call(session.peer.uid):
                response = handler(session, ticket)
        except Exception as error:
            self._send_reply(session, self._refusal(ticket, error, session.peer.uid))
            return
        self._send_reply(session, fdwire.Reply(ticket, 0, response.SerializeToString()))

    async def _answer_frame_later(
        self, session: Session, ticket: bytes, handler: Callable[[Session, bytes], Message]
    ) -> None:
        """_answer_frame for a handler that may block: it runs on the
        `calls` executor, within the uid's share of its threads."""
        session.outbox.park(ticket)
        try:
            with self._limits.call(session.peer.uid):
                async with self._limits.thread(session.peer.uid):
                    loop = asyncio.get_running_loop()
                    response = await loop.run_in_executor(self._executors.calls, handler, session, ticket)
        except Exception as error:
            self._send_reply(session, self._refusal(ticket, error, session.peer.uid))
            return
        self._send_reply(session, fdwire.Reply(ticket, 0, response.SerializeToString()))

    def _refusal(self, ticket: bytes, error: Exception, uid: int) -> fdwire.Reply:
        """The REPLY for a request that failed (called in its except block,
        so that an unexpected error is logged with its traceback)."""
        status = self._failure(error, uid) if isinstance(error, DmabufdError) else self._internal_failure()
        if status.ByteSize() > fdwire.MAX_REPLY_BODY_BYTES:  # a long message: its details stay whole
            status.message = status.message[: fdwire.MAX_REPLY_BODY_BYTES // 4]
        return fdwire.Reply(ticket, status.code, status.SerializeToString())

    def _send_reply(self, session: Session, reply: fdwire.Reply) -> None:
        undeliverable = fdwire.Reply(reply.ticket, _RELEASED_MEANWHILE.code, _RELEASED_MEANWHILE_BODY)
        with contextlib.suppress(DeliveryFailed):  # the session ended meanwhile: nobody to answer
            session.outbox.reply(reply, undeliverable)

    async def _serve_public(
        self, context: grpc.aio.ServicerContext[object, object], handler: Callable[[Session | None], T]
    ) -> T:
        """Read-only introspection that generic tools may call without the
        fd socket. A call naming a session is served like any other
        (_serve, on the loop: `handler` must never block), within its uid's
        call limit. A call without session metadata has no uid to bound
        (gRPC over AF_UNIX in Python gives no peer credentials): `handler`
        runs at once on the loop with no session, so it must be cheap
        (bookkeeping only) and must hand out nothing a session would be
        needed for: no fd, no buffer, no other client's accounting."""
        if self._names_session(context):
            return await self._serve(context, lambda session, _ticket: handler(session), blocks=never_blocks)
        try:
            return handler(None)
        except DmabufdError as error:
            await self._abort(context, error)
        except Exception:
            await self._internal(context)
