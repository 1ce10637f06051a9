"""The closer: the one way the daemon lets go of a file a client gave it.

close() of a client's file can block for as long as the client likes: the
last close of a file on a FUSE mount waits for the FUSE server's reply to
FLUSH, a TCP socket with SO_LINGER waits for unsent data to drain, a tty for
its output. The same holds for the daemon's end of a client's connection: its receive
queue may still hold files the client sent, and closing the socket drops
them. So none of these is closed on the event loop or on an executor
thread: every fd a client sent (kept as a FILE deposit or refused) and
every fd the daemon opened on a client's file (the O_DIRECT reopen, a path
opened as the client) goes to close(), which never blocks; a connection
goes to close_socket(), which reads its queue first (over several turns
of the loop if it is long) and closes it in place when no file is queued
in it (nearly always), else hands it to close(). (On kernels before 6.8,
closing a Unix socket may run the kernel's garbage collection of sockets
in flight in the closing thread; 6.8 and later, the Android 16 base
included, run it on a workqueue.)

Threads: one worker per uid that has fds waiting, started by the first and
ending when its queue is empty, so a uid whose closes hang holds up only
its own. _lock (a condition: settle() waits on it) guards the queues and
the counts; it is a leaf lock, never held across a close() or a thread
start.

Bounds: pending(uid) counts the fds of a uid not closed yet. Past
MAX_PENDING_PER_UID the fd server ends each session of that uid that
sends fds, and refuses new sessions; loads refuse to open files
(transport/fdserver.py, api/loading.py). A refused connection is queued
only if the client put a file in it, and the files a uid can have in
flight are bounded by the kernel (its RLIMIT_NOFILE). So what a hung close
makes the daemon hold stays bounded: one thread per uid, and fds the
client had to send.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

# A uid's fds waiting to be closed before its sessions are ended. Closes
# that return take microseconds, so an honest client never has more than a
# few waiting; the bound only stops one whose closes do not return.
MAX_PENDING_PER_UID = 64


# Messages read from one socket's queue per turn of the event loop: a
# sender can fill its queue with thousands of empty messages (its send
# buffer bounds them), so a long queue is read over several turns, each as
# short as any other client's.
MESSAGES_PER_TURN = 256
_CREDENTIALS_SPACE = socket.CMSG_SPACE(12)  # struct ucred
_CTRUNC = int(socket.MSG_CTRUNC)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def drain(sock: socket.socket, most: int) -> bool | None:
    """Shut `sock` down and read up to `most` messages of its queue: True
    once it is empty, so that closing it cannot drop a client's file;
    False at the first message that carries fds (left queued); None if
    `most` were read without an answer (the queue only shrinks now: ask
    again). With SO_PASSCRED every message comes with credentials, so a
    read without them is the end of the queue, even after zero-length
    messages."""
    with contextlib.suppress(OSError):  # not connected any more: its queue can still be read
        sock.shutdown(socket.SHUT_RDWR)  # nothing more can arrive
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    except OSError:
        return False
    for _ in range(most):
        try:
            _, ancillary, flags, _ = sock.recvmsg(1, _CREDENTIALS_SPACE, _PEEK)
        except ConnectionResetError:  # the peer left frames unread: reported once, then the queue reads on
            continue
        except OSError:
            return False
        if flags & _CTRUNC or any(kind == socket.SCM_RIGHTS for _, kind, _ in ancillary):
            return False
        if not ancillary:
            return True
        with contextlib.suppress(OSError):
            sock.recv(1, socket.MSG_DONTWAIT)  # a message without files: dropped
    return None


def closes_hang(uid: int, pending: int) -> str:
    """What a uid past MAX_PENDING_PER_UID is told, wherever it is refused."""
    return (
        f"uid {uid} has {pending} files it sent that the daemon is still closing (a file whose close does not "
        "return, e.g. on a FUSE mount that stopped answering); they must close first"
    )


def _stay() -> None:
    """Leave a worker where it started (a Closer without placement)."""


class Closer:
    def __init__(self, enter_worker: Callable[[], None] = _stay) -> None:
        """enter_worker: called first in each worker thread, which may have
        been started from the event loop and have its CPUs and nice (placement.py)."""
        self._enter_worker = enter_worker
        self._lock = threading.Condition(threading.Lock())
        self._queues: dict[int, collections.deque[int]] = {}
        self._pending: dict[int, int] = {}
        self._workers: set[int] = set()  # uids whose worker thread runs

    def close(self, uid: int, fds: Iterable[int]) -> None:
        """Close `fds` (now the closer's) on `uid`'s worker. Any thread."""
        fds = [fd for fd in fds if fd >= 0]
        if not fds:
            return
        with self._lock:
            self._queues.setdefault(uid, collections.deque()).extend(fds)
            self._pending[uid] = self._pending.get(uid, 0) + len(fds)
        self._ensure_worker(uid)

    def _ensure_worker(self, uid: int) -> None:
        """Start `uid`'s worker if it has fds queued and none runs."""
        with self._lock:
            start = uid in self._queues and uid not in self._workers
            if start:
                self._workers.add(uid)
        if not start:
            return
        try:
            threading.Thread(target=self._work, args=(uid,), name=f"close-uid-{uid}", daemon=True).start()
        except RuntimeError as error:
            # No thread to be had: the fds stay queued (never closed here,
            # which may be the event loop); the next close() or pending()
            # of this uid tries again.
            log.warning("cannot start a closing thread for uid %d (%s): its fds wait", uid, error)
            with self._lock:
                self._workers.discard(uid)

    def close_socket(self, uid: int, sock: socket.socket) -> None:
        """Let go of a socket a client is connected to: closed right here if
        its queue holds none of the client's files (drain), else by `uid`'s
        worker. On the event loop a long queue is read over several turns;
        elsewhere (tests) at once."""
        verdict = drain(sock, MESSAGES_PER_TURN)
        if verdict is None:
            try:
                asyncio.get_running_loop().call_soon(self.close_socket, uid, sock)
                return
            except RuntimeError:  # no loop here: read on
                while verdict is None:
                    verdict = drain(sock, MESSAGES_PER_TURN)
        if verdict:
            sock.close()
        else:
            self.close(uid, [sock.detach()])

    def settle(self, timeout_s: float) -> bool:
        """Wait until every fd handed over is closed (at stop, and in
        tests); False if some are still waiting after `timeout_s`."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending, timeout_s)

    def pending(self, uid: int) -> int:
        """How many of `uid`'s fds are waiting or being closed (and a
        worker for them is started, if one could not be before)."""
        self._ensure_worker(uid)
        with self._lock:
            return self._pending.get(uid, 0)

    def _work(self, uid: int) -> None:
        try:
            self._enter_worker()
        except Exception:  # placing the thread is not worth leaving the queue behind
            log.exception("closing thread of uid %d: could not place it", uid)
        while True:
            with self._lock:
                queue = self._queues[uid]
                if not queue:
                    del self._queues[uid]
                    self._workers.discard(uid)
                    return
                fd = queue.popleft()
            with contextlib.suppress(OSError):
                os.close(fd)
            with self._lock:
                left = self._pending[uid] - 1
                if left:
                    self._pending[uid] = left
                else:
                    del self._pending[uid]
                    self._lock.notify_all()
