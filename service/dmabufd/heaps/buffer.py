"""The buffer: one kernel buffer and the daemon's fds of it, refcounted.

Lifetime: a Buffer is made by the broker (or the model cache) from a
backend's Allocation and starts with one reference, owned by its maker.
Every holder takes a reference of its own with get() and gives it back with
put(): a ledger record, a pool's warm cache, a resident model, a grant, and
a frame in an outbox that has not been written yet. The last put() closes
the fds in _release(), exactly once. Code that reads `fd` holds a
reference for as long as it uses the number, so no thread can ever close
an fd under another one (or hand out a number the kernel reused).

Entitlement: which sessions may receive this buffer's fd right now. The
ledger entitles the owner when it books the buffer, a grant entitles its
receiver as it is redeemed, a resident model each session that holds it.
revoke() (the owner released the buffer) withdraws every entitlement: the
outbox checks entitles() at the moment it writes, so a grant, pool or model
can never deliver a buffer that was released, or that now belongs to
someone else.

Recipients: the (uid, pid) of every grant receiver the buffer went to.
Released, it stays charged while any of their processes holds it too, and
it is never given to a new owner (reusable()): a receiver may still map it,
or keep an fd in flight in a socket where /proc cannot see it.

Locking: _lock guards _refs, the entitlement set, the recipients and the
read-only fd. It is a leaf lock: nothing is called with it held except
close() of this buffer's own fds in _release, the one reopen in
seal_read_only and the seals read in reusable().
"""

from __future__ import annotations

import fcntl
import os
import threading

from dmabufd.heaps.backend import Allocation, BackendKind
from dmabufd.heaps.memfd import MEMFD_SEALS
from dmabufd_common import uapi


class BufferReleased(RuntimeError):
    """get() or fd on a buffer whose last reference is gone: a bug."""


class Buffer:
    __slots__ = ("_entitled", "_lock", "_read_only_fd", "_recipients", "_refs", "_revoked", "allocation")

    def __init__(self, allocation: Allocation) -> None:
        self.allocation = allocation
        self._lock = threading.Lock()
        self._refs = 1
        self._entitled: set[int] = set()
        self._revoked = False
        self._read_only_fd: int | None = None
        self._recipients: set[tuple[int, int]] = set()

    def __repr__(self) -> str:
        return f"<Buffer ino={self.identity[1]} {self.kind.name} {self.size} refs={self._refs}>"

    # -- facts that never change ----------------------------------------

    @property
    def size(self) -> int:
        return self.allocation.size

    @property
    def kind(self) -> BackendKind:
        return self.allocation.kind

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino): how the buffer is recognised in /proc."""
        return self.allocation.identity

    # -- references -------------------------------------------------------

    def get(self) -> Buffer:
        with self._lock:
            if self._refs <= 0:
                raise BufferReleased(f"get() on released {self!r}")
            self._refs += 1
        return self

    def put(self) -> None:
        with self._lock:
            if self._refs <= 0:
                raise BufferReleased(f"put() on released {self!r}")
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._release()

    def _release(self) -> None:
        if self._read_only_fd is not None:
            os.close(self._read_only_fd)
            self._read_only_fd = None
        self.allocation.close()

    @property
    def fd(self) -> int:
        """The daemon's read-write fd. Valid while the caller holds a reference."""
        if self._refs <= 0:
            raise BufferReleased(f"fd of released {self!r}")
        return self.allocation.fd

    def fd_for(self, read_only: bool) -> int:
        """The fd to send: the read-only one for read-only sharing (see
        seal_read_only), else the read-write one."""
        if not read_only:
            return self.fd
        with self._lock:
            if self._read_only_fd is None:
                raise BufferReleased(f"{self!r} was never sealed read-only")
            return self._read_only_fd

    # -- entitlement ----------------------------------------------------

    def entitle(self, session_id: int) -> None:
        with self._lock:
            if not self._revoked:
                self._entitled.add(session_id)

    def disentitle(self, session_id: int) -> None:
        with self._lock:
            self._entitled.discard(session_id)

    def entitles(self, session_id: int) -> bool:
        with self._lock:
            return not self._revoked and session_id in self._entitled

    def revoke(self) -> None:
        """Nobody may receive this buffer any more (released by its owner)."""
        with self._lock:
            self._revoked = True
            self._entitled.clear()

    def reinstate(self) -> None:
        """A recycled buffer starts a new life with a new owner."""
        with self._lock:
            self._revoked = False
            self._entitled.clear()

    # -- who else got it --------------------------------------------------

    def add_recipient(self, uid: int, pid: int) -> None:
        """A grant receiver (`pid` of `uid`) was given this buffer's fd."""
        with self._lock:
            self._recipients.add((uid, pid))

    def recipients(self) -> frozenset[tuple[int, int]]:
        with self._lock:
            return frozenset(self._recipients)

    def reusable(self) -> bool:
        """Whether a new owner may get this buffer (a recycled pool): only
        if it never left its owners' uid, was never sealed read-only, and,
        a memfd, carries no seal but the ones it was made with (any holder
        of a read-write fd can add seals, F_SEAL_WRITE among them)."""
        with self._lock:
            if self._recipients or self._read_only_fd is not None or self._refs <= 0:
                return False
            if self.kind is not BackendKind.MEMFD:
                return True
            try:
                # F_SEAL_EXEC (vm.memfd_noexec adds it to every memfd) is harmless.
                return fcntl.fcntl(self.allocation.fd, fcntl.F_GET_SEALS) & ~uapi.F_SEAL_EXEC == MEMFD_SEALS
            except OSError:
                return False

    # -- read-only sharing ----------------------------------------------

    def seal_read_only(self, seals: int) -> None:
        """Seal a memfd buffer with `seals` and keep one O_RDONLY fd of it,
        which every read-only delivery sends: sharing read-only never opens
        an fd per receiver. Idempotent. Only memfds can be sealed."""
        if self.kind is not BackendKind.MEMFD:
            raise ValueError("only memfd buffers can be sealed read-only")
        with self._lock:
            if self._refs <= 0:
                raise BufferReleased(f"seal of released {self!r}")
            fcntl.fcntl(self.allocation.fd, fcntl.F_ADD_SEALS, seals)
            if self._read_only_fd is None:
                self._read_only_fd = os.open(f"/proc/self/fd/{self.allocation.fd}", os.O_RDONLY | os.O_CLOEXEC)

    def can_seal(self) -> bool:
        """Whether seals may still be added: any holder of a read-write
        memfd fd can add F_SEAL_SEAL, after which nothing more can be."""
        if self.kind is not BackendKind.MEMFD:
            return False
        with self._lock:
            if self._refs <= 0:
                return False
            try:
                return not fcntl.fcntl(self.allocation.fd, fcntl.F_GET_SEALS) & uapi.F_SEAL_SEAL
            except OSError:
                return False

    @property
    def read_only(self) -> bool:
        with self._lock:
            return self._read_only_fd is not None


# What the event loop may free in place, in pages the buffers hold: freeing
# 16 MiB of memfd pages costs it about a millisecond.
INLINE_FREE_BYTES = 16 << 20


def frees_quickly(buffers: list[Buffer]) -> bool:
    """Whether letting go of `buffers` (references the caller owns) costs
    microseconds: memfds whose pages (fstat's st_blocks) come to at most
    INLINE_FREE_BYTES. A dma-buf's heap frees its pages as its last fd
    closes, at a cost fstat does not tell: a thread's job."""
    resident = 0
    for buffer in buffers:
        if buffer.kind is not BackendKind.MEMFD:
            return False
        try:
            resident += os.fstat(buffer.fd).st_blocks * 512
        except OSError:  # cannot tell: a thread's job
            return False
        if resident > INLINE_FREE_BYTES:
            return False
    return True


def put_all(buffers: list[Buffer]) -> None:
    for buffer in buffers:
        buffer.put()
