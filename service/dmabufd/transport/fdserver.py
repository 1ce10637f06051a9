"""The fd socket: where sessions begin and buffer fds leave the daemon.

One thread (the hub) owns the listening socket and reads every session
socket and pidfd through one selector. Handler threads (gRPC calls) only
send, through SessionChannel.send_fds, which serialises sends per session.

Lifetime: a session's socket and pidfd belong to the hub; the hub closes
them when the session ends (EOF, process exit, too many protocol errors, or
daemon stop). SessionChannel.close() takes the send lock first, so a sender
never writes to a file descriptor number that was closed and reused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from dmabufd.errors import DeliveryFailed
from dmabufd.sessions import procfs
from dmabufd.sessions.session import Peer, Session, SessionTable
from dmabufd_common import fdwire

log = logging.getLogger(__name__)

# A client that keeps breaking the protocol loses its session.
MAX_PROTOCOL_ERRORS = 64
# A client that does not drain its fd socket for this long fails the call
# instead of stalling a daemon thread.
SEND_TIMEOUT_S = 5.0
_PEERCRED = struct.Struct("3i")

Admission = Callable[[Peer], str | None]


class SessionChannel:
    """The daemon's end of one client's fd socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self.protocol_errors = 0

    def send_frame(self, frame: fdwire.Frame, fds: list[int] | None = None) -> None:
        with self._send_lock:
            if self.sock.fileno() < 0:
                raise DeliveryFailed("the client's fd socket is closed")
            try:
                socket.send_fds(self.sock, [fdwire.encode(frame)], fds or [])
            except TimeoutError:
                raise DeliveryFailed(
                    f"the client did not read its fd socket for {SEND_TIMEOUT_S:.0f} s; call failed"
                ) from None
            except OSError as error:
                raise DeliveryFailed(f"sending on the client's fd socket failed: {error.strerror}") from None

    def send_fds(self, ticket: bytes, buffer_ids: list[int], fds: list[int]) -> None:
        for batch in fdwire.batches(ticket, buffer_ids):
            start = batch.first_index
            self.send_frame(batch, fds[start : start + len(batch.buffer_ids)])

    def close(self) -> None:
        with self._send_lock:
            with contextlib.suppress(OSError):  # already disconnected
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()


def _peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return Peer(pid, uid, gid, procfs.supplementary_groups(pid), procfs.command_name(pid))


class FdServer:
    def __init__(self, path: Path, sessions: SessionTable, admit: Admission) -> None:
        self._path = path
        self._sessions = sessions
        self._admit = admit
        self._selector = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Per session: its channel and pidfd; touched by the hub thread only.
        self._live: dict[int, tuple[Session, SessionChannel, int]] = {}

    def start(self) -> None:
        self._listener.bind(str(self._path))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="fd-hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for session, _, _ in list(self._live.values()):
            self._end(session, "daemon stopping")
        self._selector.close()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                try:
                    self._dispatch(key)
                except Exception:  # the hub must outlive any one client
                    log.exception("fd socket: unexpected error")

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        if key.data == "accept":
            self._accept()
        elif key.data == "wake":
            os.read(self._wake_r, 64)
        else:
            kind, session = key.data
            if kind == "pidfd":
                self._end(session, f"process {session.peer.pid} exited")
            else:
                self._receive(session)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.settimeout(SEND_TIMEOUT_S)
        try:
            peer = _peer_of(conn)
            refusal = self._admit(peer)
            if refusal is not None:
                log.warning("refused pid %d uid %d: %s", peer.pid, peer.uid, refusal)
                conn.send(fdwire.encode(fdwire.ErrorFrame(grpc.StatusCode.PERMISSION_DENIED.value[0], refusal)))
                conn.close()
                return
            pidfd = os.pidfd_open(peer.pid)
        except OSError as error:
            log.warning("fd socket: dropping a connection: %s", error)
            conn.close()
            return
        channel = SessionChannel(conn)
        session = self._sessions.open(peer, channel)
        self._live[session.id] = (session, channel, pidfd)
        self._selector.register(conn, selectors.EVENT_READ, ("socket", session))
        self._selector.register(pidfd, selectors.EVENT_READ, ("pidfd", session))
        try:
            channel.send_frame(fdwire.Hello(session.id, session.token, peer.pid, peer.uid, peer.gid))
        except Exception as error:
            self._end(session, f"could not greet the client: {error}")

    def _receive(self, session: Session) -> None:
        _, channel, _ = self._live[session.id]
        try:
            data, fds, flags = fdwire.receive(channel.sock)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as error:
            self._end(session, f"fd socket error: {os.strerror(error.errno or errno.EIO)}")
            return
        if not data and not fds:
            self._end(session, "client closed its fd socket")
            return
        problem = self._accept_frame(session, data, fds, flags)
        if problem is not None:
            self._reject(session, channel, problem)

    def _accept_frame(self, session: Session, data: bytes, fds: list[int], flags: int) -> str | None:
        """Take one client frame; returns why it was refused, if it was.
        Every fd received is kept (a FILE frame's one) or closed here."""
        kept: int | None = None
        try:
            if flags & socket.MSG_CTRUNC:
                return "control data truncated: too many fds in one message"
            if flags & socket.MSG_TRUNC:
                return f"frame longer than {fdwire.MAX_FRAME_BYTES} bytes"
            try:
                frame = fdwire.decode(data)
            except fdwire.FrameError as error:
                return str(error) + (f" ({len(fds)} fds closed)" if fds else "")
            if isinstance(frame, fdwire.FileTicket):
                if len(fds) != 1:
                    return f"a FILE frame carries exactly one fd, not {len(fds)} (closed)"
                problem = self._sessions.add_ticket(session, frame.ticket, fds[0])
                if problem is None:
                    kept = fds[0]
                return problem
            if fds:
                return f"unexpected fds ({len(fds)} closed): only FILE frames carry fds"
            if isinstance(frame, fdwire.Ticket):
                return self._sessions.add_ticket(session, frame.ticket)
            return f"a client may not send {type(frame).__name__} frames"
        finally:
            for fd in fds:
                if fd != kept:
                    os.close(fd)

    def _reject(self, session: Session, channel: SessionChannel, problem: str) -> None:
        channel.protocol_errors += 1
        log.warning("session %d: protocol error: %s", session.id, problem)
        if channel.protocol_errors >= MAX_PROTOCOL_ERRORS:
            self._end(session, f"{MAX_PROTOCOL_ERRORS} protocol errors")
            return
        try:
            channel.send_frame(fdwire.ErrorFrame(grpc.StatusCode.INVALID_ARGUMENT.value[0], problem))
        except Exception as error:
            self._end(session, f"cannot report a protocol error: {error}")

    def _end(self, session: Session, reason: str) -> None:
        live = self._live.pop(session.id, None)
        if live is None:
            return
        _, channel, pidfd = live
        for registered in (channel.sock, pidfd):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(registered)
        channel.close()
        os.close(pidfd)
        self._sessions.close(session, reason)
