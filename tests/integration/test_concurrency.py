"""Load from many client processes at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import RunningDaemon

PEER = Path(__file__).with_name("peer.py")


def test_1000_allocations_from_8_concurrent_clients(daemon: RunningDaemon) -> None:
    with daemon.connect() as warmup:
        warmup.allocate(4096).close()
    baseline = daemon.settled_fd_count()
    clients = [
        subprocess.Popen(
            [sys.executable, str(PEER), "storm", str(daemon.runtime_dir), "125", str(256 << 10)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outcomes: dict[str, int] = {}
    for client in clients:
        out, _ = client.communicate(timeout=240)
        assert client.returncode == 0
        for status, count in json.loads(out).items():
            outcomes[status] = outcomes.get(status, 0) + count
    assert outcomes == {"OK": 1000}
    with daemon.connect() as observer:
        stats = observer.stats()
        assert stats.total_buffers == 0
        assert stats.allocations >= 1000
        assert stats.releases == stats.allocations
    assert daemon.wait_for_fd_count(baseline) == baseline


def test_threads_of_one_client_get_their_own_fds(daemon: RunningDaemon) -> None:
    """Calls from many threads share one fd socket; each call takes exactly
    the fds of its own ticket."""
    import os
    import threading

    errors: list[BaseException] = []
    with daemon.connect() as client:

        def work(size: int) -> None:
            try:
                for _ in range(20):
                    buffers = client.allocate_batch(size, 3)
                    for buffer in buffers:
                        assert os.fstat(buffer.fileno()).st_size == size
                        assert os.fstat(buffer.fileno()).st_ino == buffer.info.inode
                        buffer.close()
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=((index + 1) * 4096,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert client.buffers() == []
