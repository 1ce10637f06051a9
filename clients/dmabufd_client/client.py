"""The client: a session with dmabufd.

    with dmabufd_client.connect() as client:
        with client.allocate("4M", heap="system", name="frame0") as buf:
            with buf.map() as mapping:
                mapping.memoryview[:5] = b"hello"

A Client holds the session's fd socket and a gRPC channel on the control
socket. It is safe to use from several threads; each call sends its own
ticket and takes exactly its own fds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dmabufd_client.buffer import Backend, Buffer, BufferInfo
from dmabufd_client.errors import (
    DmabufdError,
    InvalidArgument,
    ProtocolError,
    Unavailable,
    from_rpc_error,
    from_status_bytes,
)
from dmabufd_client.fdchannel import FdChannel
from dmabufd_client.loading import (
    LoadedFile,
    LoadedPart,
    LoadStats,
    Model,
    ProgressCallback,
    Segment,
    TensorInfo,
    read_to_end,
)
from dmabufd_client.npu import NpuBufferTypeLike, NpuRouting, npu_routing, set_npu_fields
from dmabufd_client.pools import Grant, GrantOffer, PlanePlacement, Pool, Redeemed
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc
from dmabufd_common.fdwire import MAX_REQUEST_BYTES, SESSION_METADATA_KEY, TICKET_METADATA_KEY
from dmabufd_common.paths import default_runtime_dir, socket_paths
from dmabufd_common.units import parse_size

R = TypeVar("R")

# The control socket is local: reconnecting costs microseconds, so there is
# no reason to back off for seconds as gRPC does for remote servers. A
# channel of its own (not gRPC's process-wide subchannel pool) means a new
# Client never inherits the backoff of an earlier one whose daemon went
# away: connect() works as soon as a restarted daemon listens.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    # Not grpc.min_reconnect_backoff_ms: gRPC also takes it as the minimum
    # time one connection attempt may take, and a slow machine (the TCG
    # guest) cannot finish a handshake in 50 ms.
)

FileLike = str | os.PathLike[str] | int | IO[bytes]
LOAD_METHODS = {
    pb.LOAD_METHOD_AUTO: "auto",
    pb.LOAD_METHOD_DIRECT_COPY_FILE_RANGE: "direct-cfr",
    pb.LOAD_METHOD_DIRECT_READ: "direct-read",
    pb.LOAD_METHOD_SENDFILE: "sendfile",
    pb.LOAD_METHOD_SPLICE: "splice",
    pb.LOAD_METHOD_BUFFERED_READ: "buffered-read",
}
# Where a load's bytes came from (LoadedPart.source).
LOAD_SOURCES = {
    pb.LOAD_SOURCE_DEVICE: "device",
    pb.LOAD_SOURCE_PAGE_CACHE: "page-cache",
    pb.LOAD_SOURCE_BUFFERED: "buffered",
}


def _method_value(label: str) -> int:
    for value, name in LOAD_METHODS.items():
        if name == label:
            return value
    raise InvalidArgument(f"unknown load method {label!r}; known: {', '.join(LOAD_METHODS.values())}")


def _load_usage(usage: str | None, npu_buffer_type: NpuBufferTypeLike | None) -> str:
    """A load's usage: model-weights unless the caller said otherwise,
    where a buffer type says it (the daemon refuses a usage that
    contradicts the type)."""
    if usage is not None:
        return usage
    return "" if npu_buffer_type is not None else "model-weights"


@dataclass(frozen=True)
class HeapInfo:
    name: str
    backend: Backend
    device_path: str
    device_importable: bool
    max_buffer_bytes: int
    cpu_sync_required: bool
    aliases: tuple[str, ...]
    allowed: bool
    load_methods: tuple[str, ...]
    # memfd: the prepared memfds the daemon keeps (heaps.memfd_reserve),
    # in bytes, and how much of that is ready now (None: the daemon tells
    # admin clients only).
    reserve_bytes: int = 0
    reserve_ready_bytes: int | None = None


@dataclass(frozen=True)
class HeapEvent:
    kind: str  # "added", "removed" or "synced"
    heap: HeapInfo | None


def _heap_info(heap: pb.Heap) -> HeapInfo:
    caps = heap.capabilities
    return HeapInfo(
        name=heap.name,
        backend=Backend(caps.backend),
        device_path=heap.device_path,
        device_importable=caps.device_importable,
        max_buffer_bytes=caps.max_buffer_bytes,
        cpu_sync_required=caps.cpu_sync_required,
        aliases=tuple(heap.aliases),
        allowed=heap.allowed,
        load_methods=tuple(LOAD_METHODS.get(m, "unknown") for m in caps.load_methods),
        reserve_bytes=heap.reserve_bytes,
        reserve_ready_bytes=heap.reserve_ready_bytes if heap.HasField("reserve_ready_bytes") else None,
    )


def _is_dma_buf(result: pb.LoadResult) -> bool:
    return any(Backend(b.backend) is not Backend.MEMFD for b in result.buffers)


def buffer_info(message: pb.BufferInfo) -> BufferInfo:
    return BufferInfo(
        id=message.id,
        size=message.size,
        heap=message.heap,
        backend=Backend(message.backend),
        kernel_name=message.kernel_name,
        usage=message.usage,
        created_at=message.created_at,
        inode=message.inode,
    )


class Client:
    def __init__(self, runtime_dir: Path | None = None, timeout_s: float = 10.0) -> None:
        directory = runtime_dir or default_runtime_dir()
        self.runtime_dir = directory
        self.timeout_s = timeout_s
        sockets = socket_paths(directory)
        self._fds = FdChannel(sockets.fd, timeout_s)
        self._channel = grpc.insecure_channel(f"unix:{sockets.control}", options=CHANNEL_OPTIONS)
        # The fd socket answered, so the daemon is up: wait (within the
        # timeout) for the control connection too, so a first attempt that
        # fails on a slow machine is retried here instead of failing the
        # first call. Later calls still fail fast if the daemon goes away.
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            self._channel.close()
            self._fds.close()
            raise Unavailable(f"dmabufd's control socket {sockets.control} did not answer in {timeout_s:g} s") from None
        self._stub = pb_grpc.BufferServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._closed = threading.Event()

    @property
    def session_id(self) -> int:
        return self._fds.hello.session_id

    # -- plumbing -------------------------------------------------------

    def _metadata(self, ticket: bytes) -> tuple[tuple[str, str], ...]:
        return ((SESSION_METADATA_KEY, self._fds.token_hex), (TICKET_METADATA_KEY, ticket.hex()))

    def _call(self, method: Callable[..., R], request: object) -> tuple[R, bytes]:
        ticket = self._fds.new_ticket()
        try:
            return method(request, metadata=self._metadata(ticket), timeout=self.timeout_s), ticket
        except grpc.RpcError as error:
            self._fds.discard(ticket)
            raise from_rpc_error(error) from None

    # -- heaps ----------------------------------------------------------

    def heaps(self) -> list[HeapInfo]:
        response, _ = self._call(self._stub.ListHeaps, pb.ListHeapsRequest())
        return [_heap_info(heap) for heap in response.heaps]

    def usage_routes(self) -> dict[str, tuple[str, ...]]:
        response, _ = self._call(self._stub.ListHeaps, pb.ListHeapsRequest())
        return {route.usage: tuple(route.heap_order) for route in response.usage_routes}

    def npu_routes(self) -> NpuRouting:
        """How the daemon's dma_heap.json routes NPU buffer types (no routes without one)."""
        response, _ = self._call(self._stub.ListHeaps, pb.ListHeapsRequest())
        return npu_routing(response)

    def watch_heaps(self, include_existing: bool = True) -> Iterator[HeapEvent]:
        """Heap events until the caller stops iterating (or the daemon stops)."""
        ticket = self._fds.new_ticket()
        stream = self._stub.WatchHeaps(
            pb.WatchHeapsRequest(include_existing=include_existing), metadata=self._metadata(ticket)
        )
        kinds = {
            pb.HeapEvent.KIND_ADDED: "added",
            pb.HeapEvent.KIND_REMOVED: "removed",
            pb.HeapEvent.KIND_SYNCED: "synced",
        }
        try:
            for event in stream:
                heap = _heap_info(event.heap) if event.HasField("heap") else None
                yield HeapEvent(kinds.get(event.kind, "unknown"), heap)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(error) from None
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]

    # -- buffers --------------------------------------------------------

    def allocate_batch(
        self,
        size: int | str,
        count: int,
        *,
        heap: str = "",
        usage: str = "",
        name: str = "",
        npu_buffer_type: NpuBufferTypeLike | None = None,
        npu_device: int | None = None,
    ) -> list[Buffer]:
        """`count` buffers of `size` bytes in one call; all or none.
        npu_buffer_type ("MODEL_WEIGHTS", ...) routes as its usage, through
        the heaps the daemon's dma_heap.json lists for it (for NPU
        npu_device, or any NPU) first."""
        try:
            nbytes = parse_size(size)
        except ValueError as error:
            raise InvalidArgument(str(error)) from None
        if count < 1:
            raise InvalidArgument(f"count must be at least 1, not {count}")
        request = pb.AllocateRequest(size=nbytes, count=count, heap=heap, usage=usage, name=name)
        set_npu_fields(request, npu_buffer_type, npu_device)
        if count == 1 and request.ByteSize() <= MAX_REQUEST_BYTES:
            response, pairs = self._allocate_one(request)
        else:
            response, ticket = self._call(self._stub.Allocate, request)
            try:
                pairs = self._fds.take(ticket, len(response.buffers))
            except DmabufdError:
                self._fds.discard(ticket)
                raise
        fds = dict(pairs)
        if set(fds) != {message.id for message in response.buffers}:
            for fd in fds.values():
                os.close(fd)
            raise ProtocolError("the fds dmabufd delivered do not match the buffers it reported")
        return [Buffer(fds[message.id], buffer_info(message), self._release_one) for message in response.buffers]

    def _allocate_one(self, request: pb.AllocateRequest) -> tuple[pb.AllocateResponse, list[tuple[int, int]]]:
        """One buffer over the fd socket alone (an ALLOCATE frame): the
        daemon answers with its fd and a REPLY, no gRPC round trip. The
        answer and the errors are those of the Allocate call, which serves
        batches and requests too long for a frame (a name of 100 KB gets
        its INVALID_ARGUMENT from there)."""
        reply, fds = self._fds.allocate(request.SerializeToString())
        try:
            if reply.code:
                raise from_status_bytes(reply.body)
            try:
                response = pb.AllocateResponse.FromString(reply.body)
            except DecodeError:
                raise ProtocolError("dmabufd sent a REPLY that is not an AllocateResponse") from None
            if len(fds) != len(response.buffers):
                raise ProtocolError("dmabufd sent a REPLY whose fds do not match its buffers")
        except DmabufdError:
            for fd in fds:
                os.close(fd)
            raise
        return response, [(message.id, fd) for message, fd in zip(response.buffers, fds, strict=True)]

    def allocate(
        self,
        size: int | str,
        *,
        heap: str = "",
        usage: str = "",
        name: str = "",
        npu_buffer_type: NpuBufferTypeLike | None = None,
        npu_device: int | None = None,
    ) -> Buffer:
        return self.allocate_batch(
            size, 1, heap=heap, usage=usage, name=name, npu_buffer_type=npu_buffer_type, npu_device=npu_device
        )[0]

    def _release_one(self, buffer: Buffer) -> None:
        if not self._closed.is_set():
            self.release([buffer.id])

    def release(self, buffer_ids: list[int]) -> int:
        """Drop buffers from this session's books (their fds are not touched)."""
        response, _ = self._call(self._stub.Release, pb.ReleaseRequest(buffer_ids=buffer_ids))
        return response.released_bytes

    def buffers(self) -> list[BufferInfo]:
        response, _ = self._call(self._stub.ListBuffers, pb.ListBuffersRequest())
        return [buffer_info(message) for message in response.buffers]

    def describe(self, buffer_id: int) -> BufferInfo:
        response, _ = self._call(self._stub.DescribeBuffer, pb.DescribeBufferRequest(buffer_id=buffer_id))
        return buffer_info(response)

    def stats(self, check_proc: bool = False) -> pb.Stats:
        response, _ = self._call(self._stub.GetStats, pb.GetStatsRequest(check_proc=check_proc))
        return response

    # -- loading --------------------------------------------------------

    def _open_source(self, source: FileLike, by_path: bool) -> tuple[pb.FileSource, int | None, bool]:
        """(the request's source, the fd to send, whether we opened it)."""
        if by_path:
            if not isinstance(source, str | os.PathLike):
                raise InvalidArgument("by_path needs a path")
            return pb.FileSource(path=os.fspath(source)), None, False
        if isinstance(source, int):
            return pb.FileSource(fd=True), source, False
        if isinstance(source, str | os.PathLike):
            try:
                fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                raise InvalidArgument(f"cannot open {os.fspath(source)}: {error.strerror}") from None
            return pb.FileSource(fd=True), fd, True
        return pb.FileSource(fd=True), source.fileno(), False

    def _stream(
        self, method: Callable[..., Any], request: object, file_fd: int | None, progress: ProgressCallback | None
    ) -> tuple[pb.LoadProgress, bytes]:
        ticket = self._fds.new_ticket(file_fd)
        stream = method(request, metadata=self._metadata(ticket))
        last: pb.LoadProgress | None = None
        try:
            for message in stream:
                last = message
                if progress is not None:
                    progress(message.bytes_done, message.bytes_total)
        except grpc.RpcError as error:
            self._fds.discard(ticket)
            raise from_rpc_error(error) from None
        except BaseException:
            stream.cancel()  # e.g. KeyboardInterrupt: the daemon stops and frees the load
            self._fds.discard(ticket)
            raise
        if last is None or not last.HasField("result"):
            raise ProtocolError("the load ended without a result")
        return last, ticket

    def _stats(self, result: pb.LoadResult) -> LoadStats:
        return LoadStats(
            method=LOAD_METHODS.get(result.method, "unknown"),
            bytes=result.bytes,
            wall_seconds=result.wall_seconds,
            cpu_seconds=result.cpu_seconds,
            verified=result.verified,
            parallelism=result.parallelism,
            parts=tuple(
                LoadedPart(part.file_offset, part.length, LOAD_SOURCES.get(part.source, "unknown"))
                for part in result.parts
            ),
            bytes_from_cache=result.bytes_from_cache,
            first_tensor_seconds=result.first_tensor_seconds,
            prepared_bytes=result.prepared_bytes,
        )

    def load_file(
        self,
        source: FileLike,
        *,
        offset: int = 0,
        length: int = 0,
        heap: str = "",
        usage: str | None = None,
        name: str = "",
        method: str = "auto",
        verify: bool = False,
        max_buffer_bytes: int | str = 0,
        by_path: bool = False,
        progress: ProgressCallback | None = None,
        npu_buffer_type: NpuBufferTypeLike | None = None,
        npu_device: int | None = None,
    ) -> LoadedFile:
        """Load `length` bytes (0: to the end) of a file from `offset` into
        new buffers. The file is opened here and its fd sent, so the daemon
        reads only what this process can; by_path=True names it instead
        (the daemon must allow the directory). `usage` None: model-weights,
        or the usage of npu_buffer_type (as in allocate_batch)."""
        request = pb.LoadFileRequest(
            heap=heap,
            usage=_load_usage(usage, npu_buffer_type),
            name=name,
            method=pb.LoadMethod.ValueType(_method_value(method)),
            verify=verify,
            max_buffer_bytes=parse_size(max_buffer_bytes),
        )
        set_npu_fields(request, npu_buffer_type, npu_device)
        file_source, fd, opened = self._open_source(source, by_path)
        file_source.offset, file_source.length = offset, length
        request.source.CopyFrom(file_source)
        try:
            last, ticket = self._stream(self._stub.LoadFile, request, fd, progress)
        finally:
            if opened and fd is not None:
                os.close(fd)
        result = last.result
        pairs = dict(self._fds.take(ticket, len(result.buffers)))
        buffers = [Buffer(pairs[info.id], buffer_info(info), self._release_one) for info in result.buffers]
        segments = [Segment(s.buffer_id, s.buffer_offset, s.file_offset, s.length) for s in result.segments]
        return LoadedFile(buffers, segments, self._stats(result))

    def load_model(
        self,
        source: FileLike,
        *,
        heap: str = "",
        usage: str | None = None,
        method: str = "auto",
        verify: bool = False,
        by_path: bool = False,
        progress: ProgressCallback | None = None,
        npu_buffer_type: NpuBufferTypeLike | None = None,
        npu_device: int | None = None,
        stream: bool = False,
    ) -> Model:
        """Load a safetensors file (or share it, if another client loaded
        it already) and map its tensors as read-only numpy arrays. `usage`
        and the NPU fields route as in load_file.

        stream=True returns the Model as soon as the daemon has made its
        buffers, while the file is still being read: each tensor can be
        used once its bytes are in (Model.wait, Model.as_ready; model[name]
        waits for it). A thread of the Model's own follows the load, and
        calls `progress` from there. A model that is resident already, or
        that another client is loading at the moment, comes back whole."""
        request = pb.LoadModelRequest(
            heap=heap,
            usage=_load_usage(usage, npu_buffer_type),
            method=pb.LoadMethod.ValueType(_method_value(method)),
            verify=verify,
            stream=stream,
        )
        set_npu_fields(request, npu_buffer_type, npu_device)
        file_source, fd, opened = self._open_source(source, by_path)
        request.source.CopyFrom(file_source)
        try:
            if stream:
                return self._stream_model(request, fd, progress)
            last, ticket = self._stream(self._stub.LoadModel, request, fd, progress)
        finally:
            if opened and fd is not None:
                os.close(fd)
        return self._whole_model(last, ticket)

    def _whole_model(self, last: pb.LoadProgress, ticket: bytes) -> Model:
        result, info = last.result, last.model
        fds = dict(self._fds.take(ticket, len(result.buffers)))
        try:
            return self._model(info, fds, _is_dma_buf(result), self._stats(result))
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            self._release_model(info.model_id)
            raise

    def _stream_model(
        self, request: pb.LoadModelRequest, file_fd: int | None, progress: ProgressCallback | None
    ) -> Model:
        """A streamed LoadModel: the Model from its first message (or from
        its only one, for a model that comes whole); its thread takes the rest."""
        ticket = self._fds.new_ticket(file_fd)
        call = self._stub.LoadModel(request, metadata=self._metadata(ticket))

        def cancel() -> None:
            call.cancel()  # type: ignore[no-untyped-call]

        first: pb.LoadProgress | None = None
        try:
            for message in call:
                if progress is not None:
                    progress(message.bytes_done, message.bytes_total)
                if message.HasField("model") or message.HasField("result"):
                    first = message
                    break
        except grpc.RpcError as error:
            self._fds.discard(ticket)
            raise from_rpc_error(error) from None
        except BaseException:
            cancel()
            self._fds.discard(ticket)
            raise
        if first is None:
            self._fds.discard(ticket)
            raise ProtocolError("the load ended without describing its model")
        if first.HasField("result"):
            read_to_end(call, grpc.RpcError)
            return self._whole_model(first, ticket)
        info = first.model
        # Every buffer holds a tensor; the fds came before this message.
        buffer_ids = dict.fromkeys(t.buffer_id for t in info.tensors if t.buffer_id)
        try:
            fds = dict(self._fds.take(ticket, len(buffer_ids)))
        except BaseException:
            cancel()
            self._fds.discard(ticket)
            raise
        try:
            if fds.keys() != buffer_ids.keys():
                raise ProtocolError("the fds dmabufd delivered do not match the model's buffers")
            # Only a sealed memfd is read-only enforced; the buffers' own
            # description comes with the result, at the end.
            model = self._model(info, fds, not info.read_only_enforced, None, list(first.tensors_ready))
        except BaseException:
            cancel()
            for fd in fds.values():
                os.close(fd)
            raise

        def events() -> Iterator[tuple[list[int], LoadStats | None]]:
            try:
                for message in call:
                    if progress is not None:
                        progress(message.bytes_done, message.bytes_total)
                    stats = self._stats(message.result) if message.HasField("result") else None
                    yield list(message.tensors_ready), stats
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None

        model.follow(events(), cancel)
        return model

    def _model(
        self,
        info: pb.ModelInfo,
        fds: dict[int, int],
        dma_buf: bool,
        stats: LoadStats | None,
        ready: list[int] | None = None,
    ) -> Model:
        tensors = [TensorInfo(t.name, t.dtype, tuple(t.shape), t.buffer_id, t.offset, t.nbytes) for t in info.tensors]
        return Model(
            info.model_id,
            fds,
            tensors,
            dict(info.metadata),
            shared=info.shared,
            read_only_enforced=info.read_only_enforced,
            dma_buf=dma_buf,
            stats=stats,
            release=self._release_model,
            ready=ready or (),
        )

    def _release_model(self, model_id: int) -> None:
        if not self._closed.is_set():
            self._call(self._stub.ReleaseModel, pb.ReleaseModelRequest(model_id=model_id))

    # -- image pools and grants -------------------------------------------

    def _pool(self, info: pb.PoolInfo, received: dict[int, Buffer], owned: bool) -> Pool:
        frames = [[received[buffer_id] for buffer_id in frame.buffer_ids] for frame in info.frames]
        planes = [PlanePlacement(p.buffer_index, p.offset, p.stride, p.size) for p in info.planes]
        return Pool(
            info.pool_id,
            info.format.fourcc,
            (info.format.width, info.format.height),
            planes,
            frames,
            frame_bytes=info.frame_bytes,
            recycled=info.recycled,
            allocation_seconds=info.allocation_seconds,
            release=self._release_pool if owned else None,
        )

    def allocate_pool(
        self,
        fourcc: str,
        width: int,
        height: int,
        count: int,
        *,
        stride_align: int = 0,
        buffer_per_plane: bool = False,
        heap: str = "",
        usage: str = "camera",
        name: str = "",
        recycle: bool = False,
    ) -> Pool:
        """`count` frames of an image format, with the planes laid out as
        V4L2/DRM define them (see dmabufd_common.formats)."""
        request = pb.AllocatePoolRequest(
            format=pb.ImageFormat(fourcc=fourcc, width=width, height=height, stride_align=stride_align),
            count=count,
            buffer_per_plane=buffer_per_plane,
            heap=heap,
            usage=usage,
            name=name,
            recycle=recycle,
        )
        info, ticket = self._call(self._stub.AllocatePool, request)
        return self._pool(info, self._receive(ticket, info.buffers), owned=True)

    def _receive(self, ticket: bytes, buffers: Sequence[pb.BufferInfo]) -> dict[int, Buffer]:
        """The call's fds as Buffer objects (booked elsewhere: closing one
        releases nothing by itself), by buffer id."""
        fds = dict(self._fds.take(ticket, len(buffers)))
        if set(fds) != {b.id for b in buffers}:
            for fd in fds.values():
                os.close(fd)
            raise ProtocolError("the fds dmabufd delivered do not match the buffers it reported")
        return {b.id: Buffer(fds[b.id], buffer_info(b), None) for b in buffers}

    def _release_pool(self, pool_id: int) -> None:
        if not self._closed.is_set():
            self._call(self._stub.ReleasePool, pb.ReleasePoolRequest(pool_id=pool_id))

    def grant(self, what: Pool | Sequence[Buffer], *, to_uid: int | None = None, read_only: bool = False) -> Grant:
        """Share buffers (or a pool) with the client of uid `to_uid`, or,
        without it, with whoever redeems the returned one-time token."""
        request = pb.GrantRequest(read_only=read_only)
        if isinstance(what, Pool):
            request.pool_id = what.id
        else:
            request.buffer_ids.extend(buffer.id for buffer in what)
        if to_uid is None:
            request.token = True
        else:
            request.uid = to_uid
        response, _ = self._call(self._stub.Grant, request)
        return Grant(response.grant_id, response.token)

    def redeem(self, token: str = "", *, grant_id: int = 0) -> Redeemed:
        """Receive a grant's buffers as this process's own fds."""
        request = pb.RedeemRequest(token=token) if token else pb.RedeemRequest(grant_id=grant_id)
        response, ticket = self._call(self._stub.Redeem, request)
        received = self._receive(ticket, response.buffers)
        pool = self._pool(response.pool, received, owned=False) if response.HasField("pool") else None
        buffers = [received[b.id] for b in response.buffers]
        return Redeemed(response.grant_id, buffers, response.read_only, pool)

    def revoke(self, grant_id: int) -> None:
        self._call(self._stub.Revoke, pb.RevokeRequest(grant_id=grant_id))

    def grants(self) -> tuple[list[GrantOffer], list[GrantOffer]]:
        """(grants offered to this uid, grants this session made)."""
        response, _ = self._call(self._stub.ListGrants, pb.ListGrantsRequest())

        def offer(g: pb.GrantInfo) -> GrantOffer:
            return GrantOffer(g.grant_id, g.from_uid, g.from_pid, g.buffer_count, g.bytes, g.read_only, g.pool_id)

        return [offer(g) for g in response.offered], [offer(g) for g in response.made]

    # -- health and lifetime ----------------------------------------------

    def health(self) -> bool:
        """The standard gRPC health check (no session needed)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        """End the session: the daemon releases every buffer it booked for
        it. Buffer objects still open keep working; their fds are theirs."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._fds.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(runtime_dir: Path | str | None = None, timeout_s: float = 10.0) -> Client:
    """Open a session with the dmabufd at `runtime_dir` (default: see
    dmabufd_common.paths.default_runtime_dir)."""
    return Client(Path(runtime_dir) if runtime_dir is not None else None, timeout_s)
