"""Act on the file system as another user, on one thread, briefly.

Linux keeps credentials per thread; glibc's setuid() family broadcasts a
change to every thread of the process, but the raw setfsuid, setfsgid and
setgroups system calls change only the calling thread. The daemon uses
them on a dedicated thread to open a client's file with exactly the
client's access: leaving fsuid 0 also drops CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH for that thread, and restoring it gives them back.

One thread does all of this, one open at a time (a lock), and nothing else
ever runs on it, so no other work can observe the borrowed identity.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# (setgroups, setfsuid, setfsgid) by machine: the 32-bit-id-safe variants.
_SYSCALLS = {
    "x86_64": (116, 122, 123),
    "aarch64": (159, 151, 152),
    "arm64": (159, 151, 152),
}

_libc = ctypes.CDLL(None, use_errno=True)
_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="as-client")
_lock = threading.Lock()


def _numbers() -> tuple[int, int, int]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise OSError(f"opening files as a client is not implemented for {machine}")
    return _SYSCALLS[machine]


def _set_groups(number: int, groups: list[int]) -> None:
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _libc.syscall(number, ctypes.c_size_t(len(groups)), array) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"setgroups: {os.strerror(error)}")


def _set_fs_id(number: int, value: int) -> None:
    # setfsuid/setfsgid report no errors; reading back is how to check.
    _libc.syscall(number, ctypes.c_uint(value))
    if _libc.syscall(number, ctypes.c_uint(0xFFFFFFFF)) != value:
        raise OSError(f"could not switch the file-system id to {value}")


def _as(uid: int, gid: int, groups: frozenset[int], action: Callable[[], T]) -> T:
    setgroups, setfsuid, setfsgid = _numbers()
    saved_groups = os.getgroups()
    _set_groups(setgroups, sorted(groups | {gid}))
    try:
        _set_fs_id(setfsgid, gid)
        try:
            _set_fs_id(setfsuid, uid)
            try:
                return action()
            finally:
                _set_fs_id(setfsuid, os.geteuid())
        finally:
            _set_fs_id(setfsgid, os.getegid())
    finally:
        _set_groups(setgroups, saved_groups)


def open_as(uid: int, gid: int, groups: frozenset[int], action: Callable[[], T]) -> T:
    """Run `action` (an open) with the given file-system identity."""
    with _lock:
        return _executor.submit(_as, uid, gid, groups, action).result()
