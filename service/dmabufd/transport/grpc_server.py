"""The control socket: a gRPC server on an AF_UNIX socket."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dmabufd_common.api.v1 import dmabufd_pb2, dmabufd_pb2_grpc

# Each call holds a worker for its duration, WatchHeaps streams included.
MAX_WORKERS = 64
SERVICE_NAME = dmabufd_pb2.DESCRIPTOR.services_by_name["BufferService"].full_name


class ControlServer:
    def __init__(self, path: Path, servicer: dmabufd_pb2_grpc.BufferServiceServicer) -> None:
        self._path = path
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        dmabufd_pb2_grpc.add_BufferServiceServicer_to_server(servicer, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)

    def start(self) -> None:
        if self._server.add_insecure_port(f"unix:{self._path}") == 0:
            raise OSError(f"cannot listen on {self._path}")
        self._server.start()
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait()
