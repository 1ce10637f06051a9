"""The closer: the one way the daemon lets go of a file a client gave it.

close() of a client's file can block for as long as the client likes: the
last close of a file on a FUSE mount waits for the FUSE server's reply to
FLUSH, a TCP socket with SO_LINGER waits for unsent data to drain, a tty for
its output. The same holds for the daemon's own fd socket of a session: its
receive queue may still hold files the client sent, and closing the socket
drops them. So none of these is closed on the event loop or on an executor
thread: every fd a client sent (kept as a FILE deposit or refused), every
fd the daemon opened on a client's file (the O_DIRECT reopen, a path
opened as the client) and every session's fd socket goes to close(), which
never blocks.

Threads: one worker per uid that has fds waiting, started by the first and
ending when its queue is empty, so a uid whose closes hang holds up only
its own. _lock (a condition: settle() waits on it) guards the queues and
the counts; it is a leaf lock, never held across a close() or a thread
start.

Bounds: pending(uid) counts the fds of a uid not closed yet. Past
MAX_PENDING_PER_UID the fd server ends that uid's sessions and refuses new
ones (transport/fdserver.py), so what a hung close makes the daemon hold
stays bounded: one thread per uid, and the fds its sessions could send
before they were ended.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)

# A uid's fds waiting to be closed before its sessions are ended. Closes
# that return take microseconds, so an honest client never has more than a
# few waiting; the bound only stops one whose closes do not return.
MAX_PENDING_PER_UID = 64


class Closer:
    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._queues: dict[int, collections.deque[int]] = {}
        self._pending: dict[int, int] = {}

    def close(self, uid: int, fds: Iterable[int]) -> None:
        """Close `fds` (now the closer's) on `uid`'s worker. Any thread."""
        fds = [fd for fd in fds if fd >= 0]
        if not fds:
            return
        with self._lock:
            queue = self._queues.get(uid)
            start = queue is None
            if queue is None:
                queue = self._queues[uid] = collections.deque()
            queue.extend(fds)
            self._pending[uid] = self._pending.get(uid, 0) + len(fds)
        if start:
            try:
                threading.Thread(target=self._work, args=(uid,), name=f"close-uid-{uid}", daemon=True).start()
            except RuntimeError as error:  # no thread to be had: close here, and hope
                log.warning("cannot start a closing thread (%s): closing uid %d's fds in place", error, uid)
                self._work(uid)

    def settle(self, timeout_s: float) -> bool:
        """Wait until every fd handed over is closed (at stop, and in
        tests); False if some are still waiting after `timeout_s`."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._pending, timeout_s)

    def pending(self, uid: int) -> int:
        """How many of `uid`'s fds are waiting or being closed."""
        with self._lock:
            return self._pending.get(uid, 0)

    def _work(self, uid: int) -> None:
        while True:
            with self._lock:
                queue = self._queues[uid]
                if not queue:
                    del self._queues[uid]
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
