"""The control socket when a service manager created it: a byte relay.

grpcio (1.85, the version pinned here) cannot serve on a listening socket
it did not create. `add_insecure_port` knows `unix:`, `unix-abstract:`,
`vsock:` and host names: "fd:N" is looked up as a host name and fails,
`unix:/proc/self/fd/N` fails with EADDRINUSE, and `unix:PATH` on the path
of the inherited socket silently unlinks it and binds a new socket there
(which /dev/socket does not allow, and which would orphan the socket that
init or systemd keeps). The ways gRPC core has to adopt fds (its
"external:" acceptor, passive listeners, grpc_server_add_channel_from_fd,
the libsystemd support of builds with HAVE_LIBSYSTEMD) are C/C++ only, not
in the Python API and not in the wheel's exported symbols; "external:"
from Python crashes the process (a null channel argument).

So the gRPC server listens on a private abstract address, and this relay
accepts on the inherited socket and copies bytes both ways between each
client and a connection of its own to that address. Costs: two extra fds
per client connection, one copy of each control message on the event loop
(fds never pass here: they travel on the fd socket, which the daemon serves
itself); once 64 KiB wait to be written one way, reading the other end
pauses. Measured on a busy 2-core machine (dmabufctl bench, 64 KiB
buffers, 2 clients): allocation p50 720 -> 814 us, health check p50
549 -> 577 us.

The abstract address has no file mode, so a local process that finds its
name (in /proc/net/unix) can reach the gRPC server directly, past the
control socket file's mode; SELinux still checks connectto against the
daemon's domain, as for the socket file. It gets no more than the control
socket gives anyone (ListHeaps, health, reflection, without a session):
every other call needs a session, and sessions are only opened on the fd
socket, which the daemon serves itself, behind its file's mode and label.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


class _End(asyncio.Protocol):
    """One connection of a pair: what it reads, its partner writes."""

    def __init__(self, relay: ControlRelay, partner: _End | None = None) -> None:
        self._relay = relay
        self.partner = partner
        self.transport: asyncio.Transport | None = None
        self.got_eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._relay.ends.add(self)
        if self.partner is None:
            # A client: read nothing until its upstream connection exists.
            transport.pause_reading()
            self._relay.connect_upstream(self)

    def data_received(self, data: bytes) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.write(data)

    def eof_received(self) -> bool:
        self.got_eof = True
        partner = self.partner
        if partner is None or partner.transport is None or partner.got_eof:
            return False  # both directions done: close
        # HTTP/2 may still answer after the other side stopped sending.
        partner.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._relay.ends.discard(self)
        partner = self.partner
        if partner is not None and partner.transport is not None and not partner.closed:
            if exc is None:
                partner.transport.close()  # after what is still buffered for it
            else:
                partner.transport.abort()

    # The receiving side is slow: stop reading from the sending side.
    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()


class ControlRelay:
    """Accepts on `listener` (a listening AF_UNIX stream socket) and pipes
    each connection to the gRPC server at `upstream` (an AF_UNIX address;
    a leading NUL makes it abstract). Runs on the event loop."""

    def __init__(self, listener: socket.socket, upstream: str) -> None:
        self._listener = listener
        self._upstream = upstream
        self._server: asyncio.Server | None = None
        self.ends: set[_End] = set()
        self._connecting: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # asyncio calls listen() again with this backlog: keep the one the
        # service manager chose (the kernel caps it at somaxconn anyway).
        self._server = await loop.create_unix_server(lambda: _End(self), sock=self._listener, backlog=socket.SOMAXCONN)

    def connect_upstream(self, client: _End) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(client))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, client: _End) -> None:
        assert client.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_unix_connection(lambda: _End(self, partner=client), path=self._upstream)
        except OSError as error:
            log.warning("control relay: cannot reach the gRPC server: %s", os.strerror(error.errno or 0))
            client.transport.abort()
            return
        client.partner = upstream
        if client.closed:
            assert upstream.transport is not None
            upstream.transport.close()
            return
        client.transport.resume_reading()

    def stop_accepting(self) -> None:
        """Closes the daemon's copy of the listening socket; the service
        manager keeps its own, so clients queue there for the next start."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Drop every relayed connection (after gRPC said GOAWAY on them)."""
        self.stop_accepting()
        for task in list(self._connecting):
            task.cancel()
        for end in list(self.ends):
            if end.transport is not None:
                end.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
