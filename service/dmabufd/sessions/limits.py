"""Per-uid limits on what a client may hold of the daemon itself: calls in
flight, open WatchHeaps streams, and loads running at once. (Sessions per
uid are counted by the session table; memory by the ledger's quotas.)

Past a limit a call fails at once with RESOURCE_EXHAUSTED, except loads,
which wait for their uid's turn without holding a thread. One uid can
therefore use up only its own share: the other clients' calls never queue
behind it.

Threads: event loop only (every counter is touched by the gRPC handlers'
coroutines), so no lock is needed; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from dmabufd.config import LimitsConfig
from dmabufd.errors import Overloaded


class UidLimits:
    def __init__(self, config: LimitsConfig) -> None:
        self._config = config
        self._calls: collections.Counter[int] = collections.Counter()
        self._watches: collections.Counter[int] = collections.Counter()
        self._loads: dict[int, asyncio.Semaphore] = {}
        self._load_users: collections.Counter[int] = collections.Counter()

    @contextmanager
    def call(self, uid: int) -> Iterator[None]:
        if self._calls[uid] >= self._config.calls_per_uid:
            raise Overloaded(
                f"uid {uid} already has {self._config.calls_per_uid} calls in flight (limits.calls_per_uid); "
                "wait for some to finish"
            )
        self._calls[uid] += 1
        try:
            yield
        finally:
            self._release(self._calls, uid)

    @contextmanager
    def watch(self, uid: int) -> Iterator[None]:
        if self._watches[uid] >= self._config.watches_per_uid:
            raise Overloaded(
                f"uid {uid} already has {self._config.watches_per_uid} WatchHeaps streams open "
                "(limits.watches_per_uid); one stream sees every heap event"
            )
        self._watches[uid] += 1
        try:
            yield
        finally:
            self._release(self._watches, uid)

    @asynccontextmanager
    async def load(self, uid: int) -> AsyncIterator[None]:
        """Wait for one of the uid's load slots (a call slot is already held)."""
        semaphore = self._loads.get(uid)
        if semaphore is None:
            semaphore = self._loads[uid] = asyncio.Semaphore(self._config.loads_per_uid)
        self._load_users[uid] += 1
        try:
            async with semaphore:
                yield
        finally:
            if self._release(self._load_users, uid):
                del self._loads[uid]

    @staticmethod
    def _release(counter: collections.Counter[int], uid: int) -> bool:
        """Count one use of `uid` finished; True when it has none left."""
        counter[uid] -= 1
        if counter[uid] <= 0:
            del counter[uid]
            return True
        return False

    def calls_in_flight(self) -> int:
        return sum(self._calls.values())
