from __future__ import annotations

import os
import subprocess
import threading
from typing import cast

import pytest

from dmabufd.config import Config, Quota
from dmabufd.errors import BufferBusy, BufferNotFound, QuotaExceeded, SessionInvalid
from dmabufd.heaps.buffer import Buffer
from dmabufd.heaps.memfd import MEMFD_SPEC, MemfdBackend
from dmabufd.sessions.ledger import Ledger, Usage
from dmabufd.sessions.session import Peer, Session
from dmabufd.transport.outbox import Outbox

BACKEND = MemfdBackend(MEMFD_SPEC)
# No process has these pids: nothing of theirs is ever "still held".
GONE_PID = 1 << 22


def session(session_id: int, uid: int = 1000) -> Session:
    # The ledger never touches a session's outbox.
    return Session(session_id, Peer(GONE_PID + session_id, uid, uid, frozenset(), "test"), cast(Outbox, None))


def allocations(count: int, size: int = 4096) -> list[tuple[Buffer, str]]:
    return [(Buffer(BACKEND.allocate(size, "ledger-test")), "ledger-test") for _ in range(count)]


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
    for buffer, _ in fresh:  # still the caller's (the broker's provision)
        buffer.put()
    assert all(buffer.allocation.fd == -1 for buffer, _ in fresh), "their fds were closed"
    assert books.usage_of(1000).buffers == 0


def test_release_is_all_or_nothing_and_per_session() -> None:
    books = ledger()
    mine, theirs = session(1), session(2)
    ids = book(books, mine, 2)
    other = book(books, theirs, 1)
    with pytest.raises(BufferNotFound):
        books.release(mine, [ids[0], other[0]])
    assert len(books.session_buffers(mine.id)) == 2
    assert books.release(mine, ids)[0] == 8192
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


def test_release_revokes_and_frees_exactly_once() -> None:
    books = ledger()
    owner = session(1)
    with books.reserve(owner, [4096]) as reservation:
        (record,) = books.commit(reservation, "memfd", "", allocations(1))
    buffer = record.buffer
    assert buffer.entitles(owner.id)
    buffer.get()  # another holder (a grant, an outbox frame)
    books.release(owner, [record.id])
    assert not buffer.entitles(owner.id), "a released buffer is sent to nobody"
    assert buffer.allocation.fd >= 0, "the other holder keeps it open"
    buffer.put()
    assert buffer.allocation.fd == -1
    assert books.usage_of(1000).bytes == 0


def test_pool_buffers_are_released_only_with_their_pool() -> None:
    books = ledger()
    owner = session(1)
    with books.reserve(owner, [4096, 4096]) as reservation:
        records = books.commit(reservation, "memfd", "", allocations(2), pool_id=7)
    with pytest.raises(BufferBusy, match="belongs to pool 7"):
        books.release(owner, [records[0].id])
    released, kept = books.release(owner, [r.id for r in records], pool_id=7, keep=True)
    assert released == 8192
    assert [r.id for r in kept] == [r.id for r in records], "nobody holds them: handed back for recycling"
    for record in kept:
        record.buffer.put()


def test_linger_keeps_charged_only_what_a_client_process_still_holds() -> None:
    books = ledger()
    uid = os.geteuid()  # its own uid: the ledger looks at the client's pid alone
    books.hold(uid, 3 * 4096, 3)
    buffers = [buffer for buffer, _ in allocations(3)]
    for buffer in buffers:
        buffer.entitle(7)
    # A client process that kept one of the fds it was sent.
    client = subprocess.Popen(["sleep", "60"], pass_fds=[buffers[0].fd])
    try:
        books.linger(uid, client.pid, buffers)
        assert not any(buffer.entitles(7) for buffer in buffers), "nobody may receive them any more"
        assert books.usage_of(uid) == Usage(bytes=4096, buffers=1)
        assert books.totals().lingering == 1
        assert [buffer.allocation.fd == -1 for buffer in buffers] == [False, True, True]
        assert books.reap() == 0, "still held"
    finally:
        client.kill()
        client.wait()
    assert books.reap() == 1
    assert books.usage_of(uid) == Usage()
    assert buffers[0].allocation.fd == -1
