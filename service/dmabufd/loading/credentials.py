"""Act on the file system as another user, on one thread, briefly.

Rule: every open the daemon makes on a client's behalf runs with exactly
the client's file-system access, so the kernel's own checks (modes, ACLs,
LSMs) decide what the client may read, not a re-implementation of them.

Linux keeps credentials per thread; glibc's setuid() family broadcasts a
change to every thread of the process, but the raw setfsuid, setfsgid and
setgroups system calls change only the calling thread. Leaving fsuid 0
also drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH for that thread; the
thread then drops every other effective capability too (capset, also per
thread), so that no check an open makes (ptrace access to a /proc file,
say) passes on the daemon's privileges.

Each open gets a thread of its own that switches its credentials, runs the
open and exits. Nothing else ever runs on it, and its borrowed identity
ends with it: there is no restoring step that could fail and leave a
thread of the daemon running as a client. A thread of its own also means
an open that hangs (a file on a FUSE mount the client serves and never
answers) blocks only its own request: the caller waits OPEN_TIMEOUT_S,
and one uid has at most MAX_OPENS_PER_UID opens in flight (more wait for
a slot within the same timeout), so a hostile client cannot pile up
threads or starve other clients.

Lifetime: the action returns an fd, which open_as hands to its caller (who
then owns and closes it). If the caller has stopped waiting (timeout), the
thread closes the fd itself when the open finally returns.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
import time
from collections.abc import Callable

OPEN_TIMEOUT_S = 30.0
MAX_OPENS_PER_UID = 8

# (setgroups, setfsuid, setfsgid, capget, capset) by machine: the
# 32-bit-id-safe variants.
_SYSCALLS = {
    "x86_64": (116, 122, 123, 125, 126),
    "aarch64": (159, 151, 152, 90, 91),
    "arm64": (159, 151, 152, 90, 91),
}
_CAPABILITY_VERSION_3 = 0x20080522
_NO_ID = 0xFFFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)
# A syscall returns a long; the default int would mangle ids of 2^31 and up.
_libc.syscall.restype = ctypes.c_long


class TooManyOpens(OSError):
    """The uid has MAX_OPENS_PER_UID opens in flight already."""


# Guards _in_flight; notified whenever an open ends and frees a slot.
_slots = threading.Condition()
_in_flight: dict[int, int] = {}


def _numbers() -> tuple[int, int, int, int, int]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise OSError(errno.ENOSYS, f"opening files as a client is not implemented for {machine}")
    return _SYSCALLS[machine]


def _set_groups(number: int, groups: list[int]) -> None:
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(ctypes.c_long(number), ctypes.c_size_t(len(groups)), array) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setgroups: {os.strerror(error)}")


def _set_fs_id(number: int, value: int) -> None:
    # setfsuid/setfsgid report no errors; asking with an invalid id changes
    # nothing and returns the current one, which is how to check.
    _libc.syscall(ctypes.c_long(number), ctypes.c_uint(value))
    current = _libc.syscall(ctypes.c_long(number), ctypes.c_uint(_NO_ID)) & _NO_ID
    if current != value:
        raise OSError(errno.EPERM, f"could not switch the file-system id to {value} (it is {current})")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


def _drop_effective_capabilities(capget: int, capset: int) -> None:
    """Clear the calling thread's effective capability set (permitted and
    inheritable stay: the thread ends with its open)."""
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for number in (capget, capset):
        if number == capset:
            for word in data:
                word.effective = 0
        if _libc.syscall(ctypes.c_long(number), ctypes.byref(header), data) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"{'capget' if number == capget else 'capset'}: {os.strerror(error)}")


def _become(uid: int, gid: int, groups: frozenset[int]) -> None:
    """Switch the calling thread; raises before returning unless every
    switch took, so no action ever runs half switched."""
    setgroups, setfsuid, setfsgid, capget, capset = _numbers()
    _set_groups(setgroups, sorted(groups | {gid}))
    _set_fs_id(setfsgid, gid)
    _set_fs_id(setfsuid, uid)
    _drop_effective_capabilities(capget, capset)


class _Attempt:
    """One open's hand-over between its thread and the caller. `lock`
    decides who owns the fd when the caller gives up just as it arrives."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.abandoned = False
        self.fd: int | None = None
        self.error: BaseException | None = None


def _run(attempt: _Attempt, uid: int, gid: int, groups: frozenset[int], action: Callable[[], int]) -> None:
    try:
        fd: int | None = None
        error: BaseException | None = None
        try:
            _become(uid, gid, groups)
            fd = action()
        except BaseException as caught:
            error = caught
        with attempt.lock:
            if attempt.abandoned:
                if fd is not None:
                    os.close(fd)
                return
            attempt.fd, attempt.error = fd, error
            attempt.done.set()
    finally:
        _release(uid)


def _claim(uid: int, deadline: float) -> None:
    """Take one of the uid's slots, waiting until `deadline` for one: a
    burst of quick opens queues; only opens that hang fill every slot."""
    with _slots:
        while _in_flight.get(uid, 0) >= MAX_OPENS_PER_UID:
            left = deadline - time.monotonic()
            if left <= 0 or not _slots.wait(left):
                raise TooManyOpens(
                    errno.EAGAIN, f"uid {uid} has {MAX_OPENS_PER_UID} opens in progress that do not finish"
                )
        _in_flight[uid] = _in_flight.get(uid, 0) + 1


def _release(uid: int) -> None:
    with _slots:
        count = _in_flight[uid] - 1
        if count:
            _in_flight[uid] = count
        else:
            del _in_flight[uid]
        _slots.notify_all()


def open_as(
    uid: int, gid: int, groups: frozenset[int], action: Callable[[], int], timeout: float = OPEN_TIMEOUT_S
) -> int:
    """Run `action` (an open returning an fd) with the given file-system
    identity and return its fd, or raise what it raised; TooManyOpens
    when this uid has too many opens in flight, OSError ETIMEDOUT when
    the open hung."""
    deadline = time.monotonic() + timeout
    _claim(uid, deadline)
    attempt = _Attempt()
    thread = threading.Thread(target=_run, args=(attempt, uid, gid, groups, action), name=f"as-uid-{uid}", daemon=True)
    try:
        thread.start()
    except BaseException:
        _release(uid)
        raise
    if not attempt.done.wait(max(0.0, deadline - time.monotonic())):
        with attempt.lock:
            if not attempt.done.is_set():
                attempt.abandoned = True
                raise OSError(errno.ETIMEDOUT, f"opening the file as uid {uid} took over {timeout:g} s")
    if attempt.error is not None:
        raise attempt.error
    assert attempt.fd is not None
    return attempt.fd
