"""What /proc tells the ledger (sessions/procfs.py), and what a check of
it may cost."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmabufd.sessions import procfs


@pytest.fixture
def holder() -> Iterator[tuple[int, tuple[int, int]]]:
    """A process holding one memfd (whose identity is given) and 64 other fds."""
    memfd = os.memfd_create("held")
    spare = [os.open("/dev/null", os.O_RDONLY) for _ in range(64)]
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=[memfd, *spare],
    )
    info = os.fstat(memfd)
    for fd in (memfd, *spare):
        os.close(fd)
    try:
        yield child.pid, (info.st_dev, info.st_ino)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


def test_a_held_file_is_found_and_a_gone_one_is_not(holder: tuple[int, tuple[int, int]]) -> None:
    pid, held = holder
    gone = (held[0], held[1] + 1_000_000)
    assert procfs.still_held([pid], [held, gone]) == {held}


def test_a_check_past_its_fd_budget_takes_everything_as_held(
    holder: tuple[int, tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A uid with many fds in many processes cannot make one release walk
    them all: past the budget, what was not found yet stays charged."""
    pid, held = holder
    gone = (held[0], held[1] + 1_000_000)
    monkeypatch.setattr(procfs, "MAX_FDS_PER_CHECK", 16)
    assert procfs.still_held([pid], [held, gone]) == {held, gone}


def test_only_a_memfd_or_dma_buf_is_looked_at(tmp_path: Path) -> None:
    """A check reads a link, then the fdinfo of a memfd or dma-buf only:
    stat() through the link would ask a FUSE file's server, which the
    client may be. A regular file the process holds is not matched, even
    when its identity is asked about."""
    path = tmp_path / "plain"
    path.write_bytes(b"x")
    plain = os.open(path, os.O_RDONLY)
    memfd = os.memfd_create("buffer")
    try:
        identities = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (plain, memfd)]
        holdings = procfs.open_files(os.getpid(), identities)
        assert holdings.readable
        assert holdings.files == {identities[1]}
    finally:
        os.close(plain)
        os.close(memfd)


def test_a_kernel_whose_fdinfo_names_no_inode_keeps_every_charge(
    holder: tuple[int, tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Linux 5.14, fdinfo has no ino: line: a memfd the process
    holds may then be any wanted buffer, and all of them stay charged."""
    pid, held = holder
    gone = (held[0], held[1] + 1_000_000)
    monkeypatch.setattr(procfs, "_fd_fields", lambda *_: {"pos": "0", "flags": "02", "mnt_id": "0"})
    assert procfs.open_files(pid, [held, gone]).files == {held, gone}


def test_a_dma_buf_name_cannot_print_a_line_that_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: any holder of a dma-buf may set its name (DMA_BUF_SET_NAME),
    newlines included, and fdinfo prints the name last. Defence: the first
    line of each key counts, so a name cannot replace the kernel's ino:."""
    fdinfo = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t4242\nsize:\t4096\ncount:\t1\nexp_name:\tsystem\n"
    fdinfo += "name:\tx\nino:\t7\nsize:\t1\n"
    fd_dir = tmp_path / "proc"
    (fd_dir / "fd").mkdir(parents=True)
    (fd_dir / "fdinfo").mkdir()
    (fd_dir / "fd" / "3").symlink_to("/dmabuf:x")
    (fd_dir / "fdinfo" / "3").write_text(fdinfo)
    fields = procfs._fd_fields(str(fd_dir), "3", procfs.DMABUF_LINK)
    assert fields is not None
    assert fields["ino"] == "4242"
    assert fields["size"] == "4096"
