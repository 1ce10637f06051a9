"""The fd socket: where sessions begin and end.

Everything here runs on the event loop: accepting, reading every session's
frames, watching every session's pidfd, and ending sessions. Sockets are
non-blocking, so no client can make the loop wait; what a client may cost
is bounded (frames read per wake-up, protocol errors, sessions per uid,
the outbox's backlog).

Lifetime: a session's socket belongs to its Outbox (handed to the closer in
Outbox.close); its pidfd belongs to this server and is closed in _end(). A
file fd that arrives in a FILE frame goes to the session table (a deposit);
every other fd a client sends goes to the closer before _accept_frame
returns. None is closed here: a client's file may take as long to close as
the client likes (transport/closer.py). A uid with more than
closer.MAX_PENDING_PER_UID fds not closed yet loses its sessions and may
open none until they are.

Accept: when the daemon runs out of fds (EMFILE, ENFILE) or memory, it stops
accepting for a while (backing off up to ACCEPT_BACKOFF_MAX_S) instead of
spinning on a listening socket that stays readable.

The listening socket is either created here, bound to a path in the runtime
directory, or one a service manager created and handed over (activation.py);
either way it is closed at stop() and its file is never unlinked here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from dmabufd.config import LimitsConfig
from dmabufd.sessions import procfs
from dmabufd.sessions.session import Peer, Session, SessionTable
from dmabufd.transport.closer import MAX_PENDING_PER_UID, Closer, closes_hang
from dmabufd.transport.outbox import Outbox
from dmabufd_common import fdwire, uapi

log = logging.getLogger(__name__)

# A client that keeps breaking the protocol loses its session.
MAX_PROTOCOL_ERRORS = 64
# Frames read from one session per wake-up: a flooding client gets its
# turn like everyone else, no more.
FRAMES_PER_WAKE = 16
ACCEPTS_PER_WAKE = 32
ACCEPT_BACKOFF_MIN_S = 0.01
ACCEPT_BACKOFF_MAX_S = 1.0
STALL_CHECK_S = 0.5
_PEERCRED = struct.Struct("3i")
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Plain ints: MsgFlag's & runs enum code in Python, for every frame.
_CTRUNC = int(socket.MSG_CTRUNC)
_TRUNC = int(socket.MSG_TRUNC)

Admission = Callable[[Peer], str | None]
# Takes an ALLOCATE frame on the loop and answers it with a REPLY on the
# session's outbox, at once or from a task (api/buffers.py); never blocks.
RequestSink = Callable[[Session, fdwire.AllocateFrame], None]


def _peer_of(sock: socket.socket) -> Peer:
    """Who connected, from what the kernel recorded at connect()
    (SO_PEERCRED, SO_PEERGROUPS): /proc/<pid> shows whichever process has
    the pid when it is read, another one if the client exited and its pid
    was reused. The command name alone comes from /proc, for logs and
    stats; nothing is decided by it."""
    pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return Peer(pid, uid, gid, uapi.peer_groups(sock.fileno()), procfs.command_name(pid))


def _out_of_sight(peer: Peer) -> str | None:
    """Why a peer the daemon cannot see is refused: SO_PEERCRED gives pid 0
    for a process outside the daemon's pid namespace (a daemon in a
    container, its socket bind-mounted out), whose exit the daemon could not
    watch and whose fds and maps it could not look at, so its released
    buffers would leave its quota while it still held them."""
    if peer.pid != 0:
        return None
    return (
        "the connecting process is outside dmabufd's pid namespace, where dmabufd cannot see what it holds: "
        "connect from dmabufd's pid namespace or one inside it"
    )


def _peer_pidfd(sock: socket.socket, pid: int) -> int:
    """A pidfd of the process that connected. SO_PEERPIDFD names that very
    process (from Linux 6.16 even once it has exited: the session then ends
    at once). pidfd_open(pid), the fallback before Linux 6.5, would name
    another process if the client exited and its pid was reused before the
    accept: that race stays open on such kernels."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, uapi.SO_PEERPIDFD)
    except OSError as error:
        if error.errno == errno.EINVAL:  # Linux 6.5-6.15: the client was reaped before the accept
            raise ProcessLookupError(errno.ESRCH, "the client exited before its connection was accepted") from None
        if error.errno != errno.ENOPROTOOPT:
            raise
    return os.pidfd_open(pid)


class _Live:
    """What the server keeps per session (loop only)."""

    __slots__ = ("pidfd", "protocol_errors", "session")

    def __init__(self, session: Session, pidfd: int) -> None:
        self.session = session
        self.pidfd = pidfd
        self.protocol_errors = 0


class FdServer:
    def __init__(
        self,
        listen_on: Path | socket.socket,
        sessions: SessionTable,
        admit: Admission,
        limits: LimitsConfig,
        closer: Closer,
    ) -> None:
        """listen_on: a path to bind at start(), or a listening socket."""
        self._sessions = sessions
        self._closer = closer
        self._admit = admit
        self._limits = limits
        self._requests: RequestSink | None = None
        self._path: Path | None = None
        if isinstance(listen_on, socket.socket):
            self._listener = listen_on
        else:
            self._path = listen_on
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._live: dict[int, _Live] = {}
        self._backoff_s = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._resume_timer: asyncio.TimerHandle | None = None

    def serve_requests(self, sink: RequestSink) -> None:
        """Where ALLOCATE frames go (set once, before start)."""
        self._requests = sink

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._path is not None:
            self._listener.bind(str(self._path))
            self._listener.listen(128)
        self._listener.setblocking(False)
        loop.add_reader(self._listener.fileno(), self._accept)
        self._stall_timer = loop.call_later(STALL_CHECK_S, self._check_stalls)

    def stop(self) -> None:
        loop = self._require_loop()
        for timer in (self._stall_timer, self._resume_timer):
            if timer is not None:
                timer.cancel()
        loop.remove_reader(self._listener.fileno())
        for live in list(self._live.values()):
            self._end(live.session, "daemon stopping")
        self._listener.close()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "FdServer.start() first"
        return self._loop

    # -- accepting -------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                self._backoff_s = 0.0
                return
            except OSError as error:
                if error.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(error)
                else:
                    log.warning("fd socket: accept failed: %s", os.strerror(error.errno or errno.EIO))
                return
            self._open_session(conn)

    def _pause_accepting(self, error: OSError) -> None:
        loop = self._require_loop()
        self._backoff_s = min(ACCEPT_BACKOFF_MAX_S, max(ACCEPT_BACKOFF_MIN_S, self._backoff_s * 2))
        if self._backoff_s >= ACCEPT_BACKOFF_MAX_S or self._backoff_s == ACCEPT_BACKOFF_MIN_S:
            log.warning("fd socket: cannot accept (%s); pausing %.2f s", os.strerror(error.errno or 0), self._backoff_s)
        loop.remove_reader(self._listener.fileno())
        self._resume_timer = loop.call_later(self._backoff_s, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume_timer = None
        self._require_loop().add_reader(self._listener.fileno(), self._accept)

    def _refuse(self, conn: socket.socket, uid: int, code: grpc.StatusCode, reason: str) -> None:
        with contextlib.suppress(OSError):  # a full or dead socket: the close says enough
            conn.send(fdwire.encode(fdwire.ErrorFrame(code.value[0], reason)), socket.MSG_DONTWAIT)
        self._let_go(conn, uid)

    def _let_go(self, conn: socket.socket, uid: int) -> None:
        """Close a connection that never became a session (files the client
        sent may already be queued in it: closer.close_socket)."""
        self._closer.close_socket(uid, conn)

    def _open_session(self, conn: socket.socket) -> None:
        loop = self._require_loop()
        conn.setblocking(False)
        uid = -1  # whose closing queue a connection goes to before its peer is known
        try:
            peer = _peer_of(conn)
            uid = peer.uid
            refusal = _out_of_sight(peer) or self._admit(peer)
            if refusal is not None:
                log.warning("refused pid %d uid %d: %s", peer.pid, peer.uid, refusal)
                self._refuse(conn, peer.uid, grpc.StatusCode.PERMISSION_DENIED, refusal)
                return
            closing = self._closer.pending(peer.uid)
            if closing >= MAX_PENDING_PER_UID:
                self._refuse(conn, peer.uid, grpc.StatusCode.RESOURCE_EXHAUSTED, closes_hang(peer.uid, closing))
                return
            if self._sessions.count_for(peer.uid) >= self._limits.sessions_per_uid:
                self._refuse(
                    conn,
                    peer.uid,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"uid {peer.uid} already has {self._limits.sessions_per_uid} sessions (limits.sessions_per_uid); "
                    "close some, or share one session between threads",
                )
                return
            pidfd = _peer_pidfd(conn, peer.pid)
        except OSError as error:
            log.warning("fd socket: dropping a connection: %s", os.strerror(error.errno or errno.EIO))
            self._let_go(conn, uid)
            if error.errno in _OUT_OF_RESOURCES:
                self._pause_accepting(error)
            return
        session_id = self._sessions.next_id()

        def overflow(reason: str) -> None:  # any thread
            loop.call_soon_threadsafe(self._end_by_id, session_id, reason)

        outbox = Outbox(
            conn,
            session_id,
            loop,
            max_frames=self._limits.outbox_frames,
            stall_s=self._limits.outbox_stall_s,
            on_overflow=overflow,
            dispose=lambda sock: self._closer.close_socket(peer.uid, sock),
        )
        session = Session(session_id, peer, outbox)
        self._sessions.open(session)
        self._live[session.id] = _Live(session, pidfd)
        loop.add_reader(conn.fileno(), self._receive, session)
        loop.add_reader(pidfd, self._end, session, f"process {peer.pid} exited")
        outbox.control(fdwire.Hello(session.id, session.token, peer.pid, peer.uid, peer.gid))

    # -- reading ---------------------------------------------------------

    def _receive(self, session: Session) -> None:
        live = self._live.get(session.id)
        if live is None:
            return
        for _ in range(FRAMES_PER_WAKE):
            try:
                data, fds, flags = fdwire.receive(session.outbox.socket)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                self._end(session, f"fd socket error: {os.strerror(error.errno or errno.EIO)}")
                return
            if not data and not fds:
                self._end(session, "client closed its fd socket")
                return
            problem = self._accept_frame(session, data, fds, flags)
            if fds and self._closing_too_much(session):
                return
            if problem is not None and not self._reject(live, problem):
                return

    def _accept_frame(self, session: Session, data: bytes, fds: list[int], flags: int) -> str | None:
        """Take one client frame; returns why it was refused, if it was.
        Every fd received is kept (a FILE frame's one) or closed here."""
        kept: int | None = None
        try:
            if flags & _CTRUNC:
                return "control data truncated: too many fds in one message"
            if flags & _TRUNC:
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
            if isinstance(frame, fdwire.AllocateFrame) and self._requests is not None:
                self._requests(session, frame)
                return None
            return f"a client may not send {type(frame).__name__} frames"
        finally:
            self._closer.close(session.peer.uid, [fd for fd in fds if fd != kept])

    def _closing_too_much(self, session: Session) -> bool:
        """End the session if its uid's fds are not being closed (a file
        whose close does not return): True if it was ended."""
        closing = self._closer.pending(session.peer.uid)
        if closing < MAX_PENDING_PER_UID:
            return False
        self._end(session, closes_hang(session.peer.uid, closing))
        return True

    def _reject(self, live: _Live, problem: str) -> bool:
        """Answer a bad frame with an ERROR frame; False once the session ended."""
        live.protocol_errors += 1
        session = live.session
        log.warning("session %d: protocol error: %s", session.id, problem)
        if live.protocol_errors >= MAX_PROTOCOL_ERRORS:
            self._end(session, f"{MAX_PROTOCOL_ERRORS} protocol errors")
            return False
        try:
            session.outbox.control(fdwire.ErrorFrame(grpc.StatusCode.INVALID_ARGUMENT.value[0], problem))
        except Exception as error:
            self._end(session, f"cannot report a protocol error: {error}")
            return False
        return True

    # -- ending ----------------------------------------------------------

    def _check_stalls(self) -> None:
        loop = self._require_loop()
        now = time.monotonic()
        for live in list(self._live.values()):
            outbox = live.session.outbox
            waited = outbox.stalled_for(now)
            if waited > outbox.stall_limit_s:
                self._end(live.session, f"did not read its fd socket for {waited:.1f} s (limits.outbox_stall_s)")
        self._stall_timer = loop.call_later(STALL_CHECK_S, self._check_stalls)

    def _end_by_id(self, session_id: int, reason: str) -> None:
        live = self._live.get(session_id)
        if live is not None:
            self._end(live.session, reason)

    def _end(self, session: Session, reason: str) -> None:
        live = self._live.pop(session.id, None)
        if live is None:
            return
        loop = self._require_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(session.outbox.fileno())
        loop.remove_reader(live.pidfd)
        os.close(live.pidfd)
        session.outbox.close(reason)
        self._sessions.close(session, reason)

    def live_sessions(self) -> int:
        return len(self._live)
