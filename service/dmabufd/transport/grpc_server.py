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

The server binds the control socket's path itself, or, when a service
manager created the socket (activation.py), listens on a private abstract
address behind a relay that accepts on the inherited socket (relay.py says
why grpcio leaves no other way).
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from dmabufd.transport.relay import ControlRelay
from dmabufd_common.api.v1 import dmabufd_pb2, dmabufd_pb2_grpc

SERVICE_NAME = dmabufd_pb2.DESCRIPTOR.services_by_name["BufferService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# What reflection lists (itself included, as grpcurl expects).
REFLECTED_SERVICES = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
# Bounds what one request may make the daemon read before a handler runs.
MAX_MESSAGE_BYTES = 4 << 20


class ControlServer:
    def __init__(self, listen_on: Path | socket.socket, servicer: dmabufd_pb2_grpc.BufferServiceServicer) -> None:
        """listen_on: a path to bind, or a listening socket to relay from."""
        self._listen_on = listen_on
        self._servicer = servicer
        self._server: grpc.aio.Server | None = None
        self._health: HealthServicer | None = None
        self._relay: ControlRelay | None = None
        # Where gRPC itself listens, when that is not the control socket.
        self.private_address: str | None = None

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
        if isinstance(self._listen_on, socket.socket):
            # Random, so another process cannot take the name first.
            self.private_address = f"dmabufd-control-{os.getpid()}-{secrets.token_hex(8)}"
            address = f"unix-abstract:{self.private_address}"
        else:
            address = f"unix:{self._listen_on}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as error:
            raise OSError(f"cannot listen on {address}: {error}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        if isinstance(self._listen_on, socket.socket):
            self._relay = ControlRelay(self._listen_on, "\0" + str(self.private_address))
            await self._relay.start()
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health = server, health

    async def stop(self, grace_s: float) -> None:
        if self._server is None or self._health is None:
            return
        await self._health.enter_graceful_shutdown()
        if self._relay is not None:
            self._relay.stop_accepting()
        await self._server.stop(grace_s)
        if self._relay is not None:
            await self._relay.close()
