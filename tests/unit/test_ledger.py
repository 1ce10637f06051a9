from __future__ import annotations

import threading

import pytest

from dmabufd.config import Config, Quota
from dmabufd.errors import BufferNotFound, QuotaExceeded, SessionInvalid
from dmabufd.heaps.backend import Allocation
from dmabufd.heaps.memfd import MEMFD_SPEC, MemfdBackend
from dmabufd.sessions.ledger import Ledger
from dmabufd.sessions.session import Peer, Session

BACKEND = MemfdBackend(MEMFD_SPEC)


class NullSender:
    def send_fds(self, ticket: bytes, buffer_ids: list[int], fds: list[int]) -> None:
        del ticket, buffer_ids, fds


def session(session_id: int, uid: int = 1000) -> Session:
    return Session(session_id, Peer(100 + session_id, uid, uid, frozenset(), "test"), NullSender())


def allocations(count: int, size: int = 4096) -> list[tuple[Allocation, str]]:
    return [(BACKEND.allocate(size, "ledger-test"), "ledger-test") for _ in range(count)]


def ledger(max_bytes: int = 1 << 20, max_buffers: int = 8) -> Ledger:
    return Ledger(Config(default_quota=Quota(max_bytes, max_buffers)))


def book(target: Ledger, owner: Session, count: int, size: int = 4096) -> list[int]:
    with target.reserve(owner, [size] * count) as reservation:
        records = target.commit(reservation, "memfd", "", allocations(count, size))
    return [record.id for record in records]


def test_quota_counts_per_uid_across_sessions() -> None:
    books = ledger(max_buffers=4)
    book(books, session(1), 3)
    with pytest.raises(QuotaExceeded, match="quota of 4 buffers"):
        book(books, session(2), 2)
    book(books, session(3, uid=2000), 4)  # another uid has its own quota
    assert books.usage_of(1000).buffers == 3


def test_failed_call_returns_its_reservation() -> None:
    books = ledger(max_buffers=4)
    with pytest.raises(RuntimeError), books.reserve(session(1), [4096] * 4):
        raise RuntimeError("allocation failed")
    assert books.usage_of(1000).buffers == 0
    book(books, session(1), 4)


def test_commit_to_a_closed_session_frees_the_buffers() -> None:
    books = ledger()
    owner = session(1)
    fresh = allocations(2)
    with books.reserve(owner, [4096, 4096]) as reservation:
        owner.closed = True
        with pytest.raises(SessionInvalid):
            books.commit(reservation, "memfd", "", fresh)
    assert all(allocation.fd == -1 for allocation, _ in fresh), "their fds were closed"
    assert books.usage_of(1000).buffers == 0


def test_release_is_all_or_nothing_and_per_session() -> None:
    books = ledger()
    mine, theirs = session(1), session(2)
    ids = book(books, mine, 2)
    other = book(books, theirs, 1)
    with pytest.raises(BufferNotFound):
        books.release(mine, [ids[0], other[0]])
    assert len(books.session_buffers(mine.id)) == 2
    assert books.release(mine, ids) == 8192
    assert books.release_session(theirs) == 4096
    assert books.all_buffers() == []
    assert books.totals().releases == 3


def test_concurrent_reservations_never_exceed_the_quota() -> None:
    books = ledger(max_bytes=64 * 4096, max_buffers=1000)
    granted: list[int] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        for _ in range(20):
            try:
                ids = book(books, session(index), 1)
            except QuotaExceeded:
                continue
            with lock:
                granted.extend(ids)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 64
    assert books.usage_of(1000).bytes == 64 * 4096
