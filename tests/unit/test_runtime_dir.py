from __future__ import annotations

from pathlib import Path

import pytest

from dmabufd.transport.runtime_dir import AlreadyRunning, RuntimeDir


def test_lock_excludes_a_second_holder_and_keeps_its_sockets(tmp_path: Path) -> None:
    first = RuntimeDir(tmp_path / "rt")
    first.acquire()
    first.control_socket.write_text("pretend socket")
    second = RuntimeDir(tmp_path / "rt")
    with pytest.raises(AlreadyRunning, match="another dmabufd"):
        second.acquire()
    assert first.control_socket.exists(), "the loser must not unlink the winner's sockets"
    first.release()
    assert list((tmp_path / "rt").iterdir()) == []
    second.acquire()
    second.release()


def test_stale_sockets_are_removed_by_the_new_holder(tmp_path: Path) -> None:
    runtime = RuntimeDir(tmp_path)
    runtime.fd_socket.write_text("left by a crashed daemon")
    runtime.acquire()
    assert not runtime.fd_socket.exists()
    runtime.release()
