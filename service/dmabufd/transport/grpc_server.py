"""The control socket: a gRPC server (grpc.aio) on an AF_UNIX socket.

The server runs on the daemon's event loop. No call holds a thread while
it waits (for its ticket, its fds to be read, heap events, a load's
progress); blocking work runs on the daemon's bounded executors.

Besides dmabufd.v1.BufferService it serves, for generic tools (grpcurl,
grpc_health_probe, Postman) and without a session: the health service
(grpc.health.v1.Health: "" and the BufferService are SERVING until
shut-down begins) and server reflection (grpc.reflection.v1alpha), so a
tool needs no copy of the .proto:

    grpcurl -plaintext -unix /run/dmabufd/dmabufd.sock list
    grpcurl -plaintext -unix /run/dmabufd/dmabufd.sock dmabufd.v1.BufferService/ListHeaps

(ListHeaps is the one BufferService call answered without a session; see
api/base.py.) Reflection only describes the API, which is public anyway.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dmabufd_common.api.v1 import dmabufd_pb2, dmabufd_pb2_grpc

SERVICE_NAME = dmabufd_pb2.DESCRIPTOR.services_by_name["BufferService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# What reflection lists (itself included, as grpcurl expects).
REFLECTED_SERVICES = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
# Bounds what one request may make the daemon read before a handler runs.
MAX_MESSAGE_BYTES = 4 << 20


class ControlServer:
    def __init__(self, path: Path, servicer: dmabufd_pb2_grpc.BufferServiceServicer) -> None:
        self._path = path
        self._servicer = servicer
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None

    async def start(self) -> None:
        """Create and start the server (an aio server belongs to the loop
        that is running when it is made)."""
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        dmabufd_pb2_grpc.add_BufferServiceServicer_to_server(self._servicer, server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(REFLECTED_SERVICES, server)
        if server.add_insecure_port(f"unix:{self._path}") == 0:
            raise OSError(f"cannot listen on {self._path}")
        await server.start()
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health = server, health

    async def stop(self, grace_s: float) -> None:
        if self._server is None or self._health is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)
