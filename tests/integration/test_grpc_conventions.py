"""The gRPC conventions a generic tool and a careful client rely on: server
reflection, the health service, ListHeaps without a session (and nothing
else without one), the rich error model mapped to typed exceptions, and
the API's buf lint and breaking-change check."""

from __future__ import annotations

import errno
import inspect
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

import dmabufd_client
from dmabufd import errors as daemon_errors
from dmabufd.api.base import status_of
from dmabufd.broker import allocation_error
from dmabufd.heaps.memfd import MEMFD_SPEC, MemfdBackend
from dmabufd_client import errors as client_errors
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc
from dmabufd_common.fdwire import CONTROL_SOCKET_NAME, SESSION_METADATA_KEY
from dmabufd_common.reasons import DOMAIN, QUOTA_SUBJECT_PREFIX, Reason
from tests.conftest import DaemonFactory, RunningDaemon

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "protos/dmabufd/v1/dmabufd.proto"
RELEASE_COMMIT = "fa7c841"
sys.path.insert(0, str(REPO))

from tools import check_buf  # noqa: E402

SERVICE = pb.DESCRIPTOR.services_by_name["BufferService"]


@pytest.fixture
def channel(daemon: RunningDaemon) -> Iterator[grpc.Channel]:
    """A plain channel, as grpcurl would open: no fd socket, no metadata."""
    with grpc.insecure_channel(f"unix:{daemon.runtime_dir / CONTROL_SOCKET_NAME}") as opened:
        yield opened


def rich_status_of(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """(reason, metadata) of the ErrorInfo in a failed call's rich status."""
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == error.code().value[0]
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == DOMAIN
            return info.reason, dict(info.metadata)
    raise AssertionError(f"no ErrorInfo in {status}")


# -- reflection and health ----------------------------------------------


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"dmabufd.v1.BufferService", "grpc.health.v1.Health"} <= services, services
    service = descriptor_pool.DescriptorPool(database).FindServiceByName("dmabufd.v1.BufferService")
    assert {method.name for method in service.methods} == {method.name for method in SERVICE.methods}
    allocate = service.methods_by_name["Allocate"]
    assert allocate.input_type.fields_by_name["size"].number == 1


def test_health_without_a_session(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dmabufd.v1.BufferService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed")
def test_grpcurl_lists_heaps(daemon: RunningDaemon) -> None:
    """What the issue asks for, word for word, when grpcurl is at hand."""
    socket_path = str(daemon.runtime_dir / CONTROL_SOCKET_NAME)
    result = subprocess.run(
        ["grpcurl", "-plaintext", "-unix", socket_path, "dmabufd.v1.BufferService/ListHeaps"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"name": "memfd"' in result.stdout


# -- what needs a session -------------------------------------------------


def test_list_heaps_without_a_session(channel: grpc.Channel) -> None:
    reply = pb_grpc.BufferServiceStub(channel).ListHeaps(pb.ListHeapsRequest(), timeout=5)
    heaps = {heap.name: heap for heap in reply.heaps}
    assert "memfd" in heaps
    assert heaps["memfd"].allowed, "a heap without an access rule is open to every admitted client"
    assert "default" in {route.usage for route in reply.usage_routes}


def test_list_heaps_allowed_without_and_with_a_session(daemon_factory: DaemonFactory) -> None:
    """Without a session `allowed` says whether anyone admitted may
    allocate; with one, whether this caller may (root is listed here)."""
    daemon = daemon_factory("[heaps.access.memfd]\nuids = [0]\n")
    with grpc.insecure_channel(f"unix:{daemon.runtime_dir / CONTROL_SOCKET_NAME}") as channel:
        reply = pb_grpc.BufferServiceStub(channel).ListHeaps(pb.ListHeapsRequest(), timeout=5)
    assert not {heap.name: heap for heap in reply.heaps}["memfd"].allowed
    with daemon.connect() as client:
        assert {heap.name: heap for heap in client.heaps()}["memfd"].allowed


def test_list_heaps_naming_a_bad_session_is_refused(channel: grpc.Channel) -> None:
    """A call that names a session is held to it, ListHeaps included."""
    stub = pb_grpc.BufferServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListHeaps(pb.ListHeapsRequest(), metadata=((SESSION_METADATA_KEY, "00" * 32),), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_everything_else_needs_the_session(channel: grpc.Channel) -> None:
    """Every other method, called as a generic tool would (empty request,
    no metadata), is UNAUTHENTICATED with reason SESSION_INVALID."""
    for method in SERVICE.methods:
        if method.name == "ListHeaps":
            continue
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        path = f"/{SERVICE.full_name}/{method.name}"
        serializers = {
            "request_serializer": request_class.SerializeToString,
            "response_deserializer": response_class.FromString,
        }
        if method.server_streaming:
            stream = channel.unary_stream(path, **serializers)
            with pytest.raises(grpc.RpcError) as caught:
                list(stream(request_class(), timeout=10))
        else:
            unary = channel.unary_unary(path, **serializers)
            with pytest.raises(grpc.RpcError) as caught:
                unary(request_class(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, method.name
        assert rich_status_of(caught.value)[0] == Reason.SESSION_INVALID, method.name


def test_a_leaked_token_does_not_tell_its_uid(daemon: RunningDaemon, channel: grpc.Channel) -> None:
    """A call naming another session's token without its ticket learns no
    uid from the error's details."""
    with daemon.connect() as victim:
        token = victim._fds.token_hex
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.BufferServiceStub(channel).Allocate(
                pb.AllocateRequest(size=4096), metadata=((SESSION_METADATA_KEY, token),), timeout=5
            )
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert rich_status_of(caught.value) == (Reason.SESSION_INVALID, {})


def test_sessionless_allocate_is_a_typed_error(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        pb_grpc.BufferServiceStub(channel).Allocate(pb.AllocateRequest(size=4096), timeout=5)
    error = client_errors.from_rpc_error(caught.value)
    assert type(error) is client_errors.SessionInvalid
    assert isinstance(error, dmabufd_client.Unauthenticated)
    assert error.reason == Reason.SESSION_INVALID


# -- the rich error model -------------------------------------------------


def test_quota_denial_is_quota_exceeded_with_its_reason(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory('[quota.default]\nmax_bytes = "64K"\n')
    with daemon.connect() as client, client.allocate(32 << 10), pytest.raises(client_errors.QuotaExceeded) as caught:
        client.allocate(64 << 10)
    error = caught.value
    assert isinstance(error, dmabufd_client.ResourceExhausted), "old `except ResourceExhausted` still catches it"
    assert error.status is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == Reason.QUOTA_EXCEEDED
    assert error.metadata == {"uid": str(os.getuid())}
    ((subject, description),) = error.quota_violations
    assert subject == f"{QUOTA_SUBJECT_PREFIX}{os.getuid()}"
    assert "quota" in description
    assert not isinstance(error, client_errors.HeapOutOfMemory | client_errors.Overloaded)


def test_missing_heap_is_heap_not_found(client: dmabufd_client.Client) -> None:
    with pytest.raises(client_errors.HeapNotFound) as caught:
        client.allocate(4096, heap="no-such-heap")
    assert isinstance(caught.value, dmabufd_client.NotFound)
    assert caught.value.reason == Reason.HEAP_NOT_FOUND


def test_changed_file_is_file_changed_type() -> None:
    """FILE_CHANGED maps to its own FailedPrecondition subclass (no daemon
    needed: a load that sees its file truncated is racy to arrange)."""
    cls = client_errors.error_class(grpc.StatusCode.FAILED_PRECONDITION, Reason.FILE_CHANGED)
    assert cls is client_errors.FileChanged
    assert issubclass(cls, client_errors.FailedPrecondition)


class _FinishedCall(grpc.RpcError, grpc.Call):
    """A failed call as the client library receives it, built from the
    grpc.Status the daemon's _abort sends (code, details, trailers): the
    transport between the two is what the quota test covers for real."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    @classmethod
    def aborted_with(cls, status: grpc.Status) -> _FinishedCall:
        """The call as a context.abort_with_status(status) ends it."""
        return cls(status.code, status.details, tuple(status.trailing_metadata))

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


@pytest.mark.parametrize("code", [errno.ENOMEM, errno.ENOSPC])
def test_heap_out_of_memory_reaches_the_client_as_its_own_type(code: int) -> None:
    """A heap out of memory, at the unit level: this machine has no heap
    whose allocation a test can make fail with ENOMEM (memfd_create and
    ftruncate allocate no pages), so the kernel's error is given to the
    broker's mapping as an OSError, and the status the daemon would send is
    decoded by the client library. (The quota test above is end to end.)"""
    error = allocation_error(MemfdBackend(MEMFD_SPEC), OSError(code, os.strerror(code)))
    assert isinstance(error, daemon_errors.OutOfMemory)
    assert error.reason is Reason.HEAP_OUT_OF_MEMORY
    status = status_of(error.status, str(error), error.reason, None, error.metadata)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    received = client_errors.from_rpc_error(_FinishedCall.aborted_with(rpc_status.to_status(status)))
    assert type(received) is client_errors.HeapOutOfMemory
    assert isinstance(received, dmabufd_client.ResourceExhausted)
    assert received.reason == Reason.HEAP_OUT_OF_MEMORY
    assert received.metadata == {}, "only quota denials name the uid"
    assert received.quota_violations == (), "out of memory is not a quota"
    assert "out of memory" in received.message
    quota = client_errors.from_rpc_error(
        _FinishedCall.aborted_with(
            rpc_status.to_status(status_of(grpc.StatusCode.RESOURCE_EXHAUSTED, "q", Reason.QUOTA_EXCEEDED, 1))
        )
    )
    assert type(quota) is client_errors.QuotaExceeded, "a quota denial and out of memory are different types"


def test_other_allocation_errors_are_not_out_of_memory() -> None:
    error = allocation_error(MemfdBackend(MEMFD_SPEC), OSError(errno.EFBIG, os.strerror(errno.EFBIG)))
    assert isinstance(error, daemon_errors.HeapUnavailable)
    assert error.reason is Reason.HEAP_UNAVAILABLE


def test_a_reason_that_disagrees_with_the_status_is_ignored() -> None:
    """A reason is trusted only with its own status code."""
    status = status_of(grpc.StatusCode.NOT_FOUND, "odd", Reason.QUOTA_EXCEEDED, None)
    received = client_errors.from_rpc_error(_FinishedCall.aborted_with(rpc_status.to_status(status)))
    assert type(received) is client_errors.NotFound
    assert received.reason == Reason.QUOTA_EXCEEDED


def test_a_status_without_details_keeps_its_status_class() -> None:
    """An old daemon, or an error from gRPC itself: no rich status."""
    received = client_errors.from_rpc_error(_FinishedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"))
    assert type(received) is client_errors.ResourceExhausted
    assert received.reason is None
    assert received.metadata == {}


def _daemon_error_classes() -> list[type[daemon_errors.DmabufdError]]:
    return [
        cls
        for _, cls in inspect.getmembers(daemon_errors, inspect.isclass)
        if issubclass(cls, daemon_errors.DmabufdError)
        and cls is not daemon_errors.DmabufdError
        and cls.__module__ == daemon_errors.__name__
    ]


def test_every_daemon_error_has_a_reason_of_its_own() -> None:
    classes = _daemon_error_classes()
    reasons = [cls.reason for cls in classes]
    assert None not in reasons, [cls.__name__ for cls in classes if cls.reason is None]
    assert len(set(reasons)) == len(reasons), "one reason per class"


def test_the_proto_documents_every_reason_with_its_status() -> None:
    """The reason table in dmabufd.proto's header, the Reason enum, and
    the daemon's error classes agree: names and status codes."""
    rows = re.findall(r"^//   ([A-Z_]+) +([A-Z_]+) +\S", PROTO.read_text(), re.MULTILINE)
    table = {reason: code for reason, code in rows if reason != "reason"}
    assert set(table) == {reason.value for reason in Reason}
    for cls in _daemon_error_classes():
        assert cls.reason is not None
        assert table[cls.reason.value] == cls.status.name, cls.__name__
    for reason, mapped in client_errors._BY_REASON.items():
        assert mapped.status is not None
        assert table[reason] == mapped.status.name, mapped.__name__


# -- buf --------------------------------------------------------------------


@pytest.fixture(scope="module")
def buf() -> Path:
    try:
        return check_buf.find_buf()
    except check_buf.BufUnavailable as error:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"buf cannot run under CI: {error}", pytrace=False)
        pytest.skip(str(error))


def test_buf_lint_and_breaking_are_clean(buf: Path) -> None:
    findings = check_buf.check(buf)
    assert findings.lint == []
    assert findings.breaking == [], "the API must stay compatible with the last release"


def test_buf_breaking_catches_a_retyped_field(buf: Path, tmp_path: Path) -> None:
    """The check has teeth: a field changed since the release is caught,
    and so is an element left without a comment."""
    protos = tmp_path / "protos"
    shutil.copytree(REPO / "protos", protos)
    proto = protos / "dmabufd/v1/dmabufd.proto"
    text = proto.read_text()
    changed = text.replace("  int32 pid = 2;", "  int64 pid = 2;").replace("  // Its primary gid.\n", "")
    assert changed != text
    proto.write_text(changed)
    findings = check_buf.check(buf, protos)
    assert any('"pid"' in line and "int64" in line for line in findings.breaking), findings.breaking
    assert any('"gid"' in line and "comment" in line for line in findings.lint), findings.lint


def test_the_released_snapshot_is_the_release() -> None:
    released = REPO / "protos/released/dmabufd/v1/dmabufd.proto"
    result = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{RELEASE_COMMIT}:protos/dmabufd/v1/dmabufd.proto"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"commit {RELEASE_COMMIT} is not in this clone (shallow?)")
    assert released.read_bytes() == result.stdout
