"""A daemon with a memfd reserve ([heaps] memfd_reserve): loads and
allocations of a fitting size get prepared memfds, hold exactly what a fresh
one would, say so, and the reserve fills up again with no fd left behind."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path

import dmabufd_client
from dmabufd.heaps.memfd import MEMFD_SEALS
from dmabufd.heaps.reserve import PREPARED_NAME, RETRY_S
from dmabufd_client import Access
from tests.conftest import DaemonFactory, RunningDaemon, run_as_rootless_client
from tests.integration.test_load_paths import drop_cache
from tests.integration.test_loading import loaded_bytes, make_file
from tests.integration.test_models import make_model

MIB = 1 << 20
RESERVE = 64 * MIB
CONFIG = '[heaps]\nmemfd_reserve = ["64M"]\n'


def memfd_heap(client: dmabufd_client.Client) -> dmabufd_client.HeapInfo:
    (heap,) = [heap for heap in client.heaps() if heap.name == "memfd"]
    return heap


def wait_until_prepared(client: dmabufd_client.Client, timeout_s: float = 2 * RETRY_S) -> None:
    """(Longer than a wait for memory to spare, so a busy machine delays the test, not fails it.)"""
    deadline = time.monotonic() + timeout_s
    while (memfd_heap(client).reserve_ready_bytes or 0) < RESERVE:
        if time.monotonic() > deadline:
            raise AssertionError(f"the reserve is not prepared after {timeout_s} s: {memfd_heap(client)}")
        time.sleep(0.02)


def test_the_heap_list_shows_the_reserve(daemon_factory: DaemonFactory) -> None:
    with daemon_factory(CONFIG).connect() as client:
        wait_until_prepared(client)
        heap = memfd_heap(client)
        assert heap.reserve_bytes == RESERVE
        assert heap.reserve_ready_bytes == RESERVE
    with daemon_factory(name="plain").connect() as client:
        heap = memfd_heap(client)
        assert (heap.reserve_bytes, heap.reserve_ready_bytes) == (0, None)


def test_a_load_into_prepared_memory_holds_the_files_bytes_and_says_so(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    path = tmp_path / "weights.bin"
    data = make_file(path, 48 * MIB + 123)
    daemon = daemon_factory(CONFIG)
    with daemon.connect() as client:
        for _ in range(2):  # the second from a memfd prepared after the first was taken
            wait_until_prepared(client)
            drop_cache(path)
            with client.load_file(path) as loaded:
                assert loaded.stats.prepared_bytes == 48 * MIB + 4096
                assert loaded_bytes(loaded) == data
                (buffer,) = loaded.buffers
                assert buffer.info.size == 48 * MIB + 4096
                # The page past the file's end reads as zeros, as in a fresh memfd.
                with buffer.map(Access.READ) as mapping:
                    assert bytes(mapping.memoryview[len(data) :]) == bytes(buffer.info.size - len(data))


def test_what_does_not_fit_the_reserve_gets_fresh_memory(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "small.bin"
    data = make_file(path, 4 * MIB)
    with daemon_factory(CONFIG).connect() as client:
        wait_until_prepared(client)
        with client.load_file(path) as loaded:
            assert loaded.stats.prepared_bytes == 0
            assert loaded_bytes(loaded) == data
        assert memfd_heap(client).reserve_ready_bytes == RESERVE


def test_allocations_never_take_prepared_memory(daemon_factory: DaemonFactory) -> None:
    """Only loads do: an Allocate runs on the event loop, and taking a
    prepared memfd frees the pages past the size asked for."""
    with daemon_factory(CONFIG).connect() as client:
        wait_until_prepared(client)
        with client.allocate(RESERVE, heap="memfd") as buffer:
            assert not os.readlink(f"/proc/self/fd/{buffer.fileno()}").startswith(f"/memfd:{PREPARED_NAME}")
            assert fcntl.fcntl(buffer.fileno(), fcntl.F_GET_SEALS) & MEMFD_SEALS == MEMFD_SEALS
        assert memfd_heap(client).reserve_ready_bytes == RESERVE


def test_a_model_bound_for_memfds_takes_prepared_memory(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    make_model(path, seed=7, megabytes=40)
    with daemon_factory(CONFIG).connect() as client:
        wait_until_prepared(client)
        with client.load_model(path) as model:
            # One buffer for the model's 40 MiB and a little more.
            assert 40 * MIB < model.stats.prepared_bytes <= RESERVE


def test_the_daemons_fds_come_back_to_where_they_were(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    make_file(path, 48 * MIB)
    daemon: RunningDaemon = daemon_factory(CONFIG)
    with daemon.connect() as client:
        wait_until_prepared(client)
        client.allocate(4096).close()
        before = daemon.settled_fd_count()
        for _ in range(3):
            with client.load_file(path):
                pass
        wait_until_prepared(client)
        assert daemon.settled_fd_count() == before


def test_another_uid_never_gets_memory_a_load_used(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """A released buffer never goes back to the reserve (a holder may keep
    its fd): an unprivileged client loading right after a load into
    prepared memory gets a prepared memfd of its own, whose bytes past its
    file's end are zeros, not the first load's."""
    secret = tmp_path / "secret.bin"
    make_file(secret, 48 * MIB)
    daemon = daemon_factory(CONFIG, public=True)
    public = Path(tempfile.mkdtemp(prefix="dmabufd-reserve-"))
    try:
        public.chmod(0o755)
        mine = public / "mine.bin"
        data = make_file(mine, 40 * MIB + 100)
        mine.chmod(0o644)
        with daemon.connect() as client:
            wait_until_prepared(client)
            with client.load_file(secret) as loaded:
                assert loaded.stats.prepared_bytes == 48 * MIB
            wait_until_prepared(client)
        # Only what the client had imported before it dropped root: the
        # interpreter's own files may be out of an unprivileged uid's reach.
        body = (
            f"with open({str(mine)!r}, 'rb') as f:\n"
            "    data = f.read()\n"
            f"with c.load_file({str(mine)!r}) as loaded:\n"
            "    (buffer,) = loaded.buffers\n"
            "    with buffer.map(dmabufd_client.Access.READ) as m:\n"
            "        whole = bytes(m.memoryview)\n"
            "    print(loaded.stats.prepared_bytes)\n"
            "    print(whole[: len(data)] == data)\n"
            "    print(whole[len(data) :] == bytes(len(whole) - len(data)))\n"
        )
        result = run_as_rootless_client(daemon, body)
        assert result.returncode == 0, result.stderr
        prepared, same, zeros = result.stdout.split()
        assert int(prepared) == len(data) // 4096 * 4096 + 4096
        assert same == "True"
        assert zeros == "True"
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_only_admins_see_how_much_is_ready(daemon_factory: DaemonFactory) -> None:
    """How much of the reserve is ready moves when anyone loads: a client
    that is not an admin sees the reserve's size, not that."""
    daemon = daemon_factory(CONFIG, public=True)
    with daemon.connect() as client:
        wait_until_prepared(client)
    body = (
        "(heap,) = [h for h in c.heaps() if h.name == 'memfd']\nprint(heap.reserve_bytes, heap.reserve_ready_bytes)\n"
    )
    result = run_as_rootless_client(daemon, body)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(RESERVE), "None"]
