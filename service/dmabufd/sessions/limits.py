"""Per-uid limits on what a client may hold of the daemon itself: calls in
flight, open WatchHeaps streams, and loads running at once. (Sessions per
uid are counted by the session table; memory by the ledger's quotas.)

Past a limit a call fails at once with RESOURCE_EXHAUSTED, except loads and
blocking handlers, which wait for their uid's turn (its share of the load
or calls executor) without holding a thread. One uid can
therefore use up only its own share: the other clients' calls never queue
behind it.

Threads: event loop only (every counter is touched by the gRPC handlers'
coroutines), so no lock is needed; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager

from dmabufd.config import LimitsConfig
from dmabufd.errors import Overloaded


class _Turns:
    """A uid's semaphore, and how many calls use or wait for it."""

    __slots__ = ("semaphore", "users")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore = semaphore
        self.users = 0


_CALLS_REFUSAL = "uid {uid} already has {limit} calls in flight (limits.calls_per_uid); wait for some to finish"
_WATCHES_REFUSAL = (
    "uid {uid} already has {limit} WatchHeaps streams open (limits.watches_per_uid); one stream sees every heap event"
)


class _Slot:
    """One of `limit` slots of `uid` in `counter`, or Overloaded at once.
    A class, not a generator: every call and ALLOCATE frame takes one."""

    __slots__ = ("_counter", "_limit", "_refusal", "_uid")

    def __init__(self, counter: collections.Counter[int], uid: int, limit: int, refusal: str) -> None:
        self._counter = counter
        self._uid = uid
        self._limit = limit
        self._refusal = refusal

    def __enter__(self) -> None:
        counter, uid = self._counter, self._uid
        if counter[uid] >= self._limit:
            raise Overloaded(self._refusal.format(uid=uid, limit=self._limit))
        counter[uid] += 1

    def __exit__(self, *_exc: object) -> None:
        counter, uid = self._counter, self._uid
        counter[uid] -= 1
        if counter[uid] <= 0:
            del counter[uid]


class UidLimits:
    def __init__(self, config: LimitsConfig) -> None:
        self._config = config
        self._calls: collections.Counter[int] = collections.Counter()
        self._watches: collections.Counter[int] = collections.Counter()
        self._loads: dict[int, _Turns] = {}
        self._threads: dict[int, _Turns] = {}

    def call(self, uid: int) -> AbstractContextManager[None]:
        return _Slot(self._calls, uid, self._config.calls_per_uid, _CALLS_REFUSAL)

    def watch(self, uid: int) -> AbstractContextManager[None]:
        return _Slot(self._watches, uid, self._config.watches_per_uid, _WATCHES_REFUSAL)

    def load(self, uid: int) -> AbstractAsyncContextManager[None]:
        """Wait for one of the uid's load slots (a call slot is already held)."""
        return self._turn(self._loads, uid, self._config.loads_per_uid)

    def thread(self, uid: int) -> AbstractAsyncContextManager[None]:
        """Wait for one of the uid's shares of the calls executor: one uid's
        blocking calls never occupy every thread."""
        return self._turn(self._threads, uid, self._config.threads_per_uid)

    @asynccontextmanager
    async def _turn(self, turns: dict[int, _Turns], uid: int, size: int) -> AsyncIterator[None]:
        entry = turns.get(uid)
        if entry is None:
            entry = turns[uid] = _Turns(asyncio.Semaphore(size))
        entry.users += 1
        try:
            async with entry.semaphore:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del turns[uid]

    def calls_in_flight(self) -> int:
        return sum(self._calls.values())
