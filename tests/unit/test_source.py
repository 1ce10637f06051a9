"""The file-source rule, without a daemon: the daemon reads only what the
client itself could read (loading/source.py, loading/credentials.py), and
never maps a file a client controls (loader._digest_of_file).

Tests that switch a thread to another uid need root; run as anyone else
they fail, on purpose, rather than skip: a suite that quietly skips them
proves nothing about the rule."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmabufd.errors import AccessDenied, FileChanged, FileNotFound, InvalidRequest, bounded
from dmabufd.heaps.backend import BackendKind, HeapBackend, HeapSpec
from dmabufd.heaps.memfd import MemfdBackend
from dmabufd.loading import credentials, source
from dmabufd.loading.loader import _digest_of_file, choose_method
from dmabufd.loading.method import Method
from dmabufd.loading.methods import Piece
from dmabufd.loading.source import SourceFile, from_client_fd, open_as_client
from dmabufd.sessions.session import Peer
from dmabufd.transport.closer import Closer
from dmabufd_common import uapi

OTHER_UID = 12345

# Lets go of the files the tests open, as the daemon's does.
CLOSER = Closer()


def peer(uid: int) -> Peer:
    return Peer(pid=os.getpid(), uid=uid, gid=uid, groups=frozenset(), command="test")


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(f"this test needs root: it opens files as uid {OTHER_UID} on a thread of its own")


def fd_is_open(fd: int) -> bool:
    """Whether `fd` is open, once every fd handed to the closer is closed."""
    assert CLOSER.settle(5.0), "the closer did not close what it was given"
    return _open_now(fd)


def _open_now(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as error:
        return error.errno != errno.EBADF
    return True


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A load root another uid may search (tmp_path is 0700)."""
    directory = tmp_path / "root"
    directory.mkdir()
    directory.chmod(0o755)
    (directory / "a").mkdir()
    (directory / "a").chmod(0o755)
    (directory / "data.bin").write_bytes(b"weights")
    (directory / "data.bin").chmod(0o644)
    (directory / "private.bin").write_bytes(b"root only")
    (directory / "private.bin").chmod(0o600)
    (tmp_path / "secret.bin").write_bytes(b"secret")
    (tmp_path / "secret.bin").chmod(0o600)
    return directory


def opened(path: Path | str, who: Peer, roots: tuple[Path, ...]) -> bytes:
    loaded = open_as_client(str(path), who, roots, CLOSER)
    try:
        return os.pread(loaded.buffered_fd, 100, 0)
    finally:
        loaded.close()


# bounded()


def test_bounded_quotes_short_text_like_repr() -> None:
    assert bounded("/srv/models/a.bin") == "'/srv/models/a.bin'"
    assert bounded("it's\n\0") == "'it\\'s\\n\\x00'"


def test_bounded_cuts_long_text_and_says_how_long_it_was() -> None:
    assert bounded("/very/long/path" * 400, 10) == "'/very/long...' (6000 chars)"
    assert len(bounded("\0" * 5000)) < 150, "escapes count against the limit too"


# fds the client sends


def test_o_path_fd_is_refused(root: Path) -> None:
    fd = os.open(root / "data.bin", os.O_PATH | os.O_CLOEXEC)
    with pytest.raises(AccessDenied, match=r"O_PATH.*open the file for reading and send that fd"):
        from_client_fd(fd, peer(os.geteuid()), CLOSER)
    assert not fd_is_open(fd), "a refused fd is closed"


def test_write_only_fd_is_refused(root: Path) -> None:
    fd = os.open(root / "data.bin", os.O_WRONLY | os.O_CLOEXEC)
    with pytest.raises(AccessDenied, match=r"writing only.*open the file for reading and send that fd"):
        from_client_fd(fd, peer(os.geteuid()), CLOSER)
    assert not fd_is_open(fd)


def test_read_write_fd_is_accepted(root: Path) -> None:
    loaded = from_client_fd(os.open(root / "data.bin", os.O_RDWR | os.O_CLOEXEC), peer(os.geteuid()), CLOSER)
    try:
        assert os.pread(loaded.buffered_fd, 100, 0) == b"weights"
        assert loaded.size == 7
        assert loaded.check_range(0, 0) == (0, 7)
    finally:
        loaded.close()
    assert loaded.buffered_fd == -1
    assert loaded.direct_fd is None


def _fifo_fd(root: Path) -> int:
    os.mkfifo(root / "fifo")
    return os.open(root / "fifo", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def _dir_fd(root: Path) -> int:
    return os.open(root, os.O_RDONLY | os.O_CLOEXEC)


def _socket_fd(_root: Path) -> int:
    left, right = socket.socketpair()
    right.close()
    return left.detach()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("make", "kind"), [(_fifo_fd, "a FIFO"), (_dir_fd, "a directory"), (_socket_fd, "a socket")])
def test_fd_of_a_file_that_is_not_regular_is_refused(root: Path, make: Callable[[Path], int], kind: str) -> None:
    fd = make(root)
    with pytest.raises(InvalidRequest, match=f"is {kind}, not a regular file"):
        from_client_fd(fd, peer(os.geteuid()), CLOSER)
    assert not fd_is_open(fd)


# paths


def test_path_beneath_the_root_opens(root: Path) -> None:
    (root / "inside").symlink_to("a/../data.bin")
    me = peer(os.geteuid())
    assert opened(root / "data.bin", me, (root,)) == b"weights"
    assert opened(f"{root}//./a/../data.bin", me, (root,)) == b"weights"
    assert opened(root / "inside", me, (root,)) == b"weights", "a symlink that stays beneath is fine"


def test_path_through_the_roots_real_name_opens(root: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(root)
    assert opened(root / "data.bin", peer(os.geteuid()), (tmp_path / "alias",)) == b"weights"
    assert opened(tmp_path / "alias" / "data.bin", peer(os.geteuid()), (tmp_path / "alias",)) == b"weights"


def test_path_outside_every_root_is_refused(root: Path, tmp_path: Path) -> None:
    with pytest.raises(AccessDenied, match="outside the directories this daemon loads from"):
        open_as_client(str(tmp_path / "secret.bin"), peer(os.geteuid()), (root,), CLOSER)
    with pytest.raises(AccessDenied, match="outside the directories"):
        open_as_client(f"{root}x/data.bin", peer(os.geteuid()), (root,), CLOSER)


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_symlink_inside_the_root_pointing_outside_is_refused(root: Path, tmp_path: Path, target: str) -> None:
    (root / "escape").symlink_to(tmp_path / "secret.bin" if target == "absolute" else "../secret.bin")
    with pytest.raises(AccessDenied, match="leads outside the directories this daemon loads from"):
        open_as_client(str(root / "escape"), peer(os.geteuid()), (root,), CLOSER)


def test_dotdot_escape_is_refused(root: Path) -> None:
    with pytest.raises(AccessDenied, match="leads outside the directories"):
        open_as_client(f"{root}/a/../../secret.bin", peer(os.geteuid()), (root,), CLOSER)


def test_magic_link_is_refused(tmp_path: Path) -> None:
    """/proc/PID/fd/N and /proc/PID/root jump anywhere, beneath or not."""
    (tmp_path / "secret.bin").write_bytes(b"secret")
    fd = os.open(tmp_path / "secret.bin", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for path in (f"/proc/self/fd/{fd}", f"/proc/self/root{tmp_path}/secret.bin"):
            with pytest.raises(AccessDenied, match="magic link"):
                open_as_client(path, peer(os.geteuid()), (Path("/proc"),), CLOSER)
    finally:
        os.close(fd)


def test_missing_file_is_not_found(root: Path) -> None:
    with pytest.raises(FileNotFound, match="does not exist"):
        open_as_client(str(root / "missing.bin"), peer(os.geteuid()), (root,), CLOSER)


@pytest.mark.timeout(10)
def test_path_of_a_file_that_is_not_regular_is_refused_without_blocking(root: Path) -> None:
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(root / "socket"))
        me = peer(os.geteuid())
        with pytest.raises(InvalidRequest, match="is a FIFO, not a regular file"):
            open_as_client(str(root / "fifo"), me, (root,), CLOSER)
        with pytest.raises(InvalidRequest, match="is a directory, not a regular file"):
            open_as_client(str(root / "a"), me, (root,), CLOSER)
        with pytest.raises(InvalidRequest, match="is a directory"):
            open_as_client(str(root), me, (root,), CLOSER)
        with pytest.raises(InvalidRequest, match="a socket"):
            open_as_client(str(root / "socket"), me, (root,), CLOSER)


@pytest.fixture
def no_syscalls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the path gets as far as choosing a root or opening."""

    def forbidden(*_args: object) -> None:
        raise AssertionError("a malformed path reached the file system")

    monkeypatch.setattr(source, "_choose_root", forbidden)
    monkeypatch.setattr(source, "_openat2", forbidden)


@pytest.mark.usefixtures("no_syscalls")
@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/srv/" + "x" * 4092, "is 4097 bytes long; a path may have at most 4096"),
        ("/srv/a\0/../../etc/shadow", "contains a NUL byte"),
        ("srv/a.bin", "is not absolute"),
    ],
)
def test_malformed_paths_are_refused_before_any_system_call(path: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidRequest, match=message) as caught:
        open_as_client(path, peer(os.geteuid()), (Path("/srv"),), CLOSER)
    assert time.monotonic() - started < 0.1
    assert len(str(caught.value)) < 300, "the message does not echo the whole path"


def test_errors_do_not_echo_a_long_path(root: Path) -> None:
    with pytest.raises(AccessDenied) as caught:
        open_as_client("/elsewhere/" + "y" * 4000, peer(os.geteuid()), (root,), CLOSER)
    assert len(str(caught.value)) < 400
    assert "(4011 chars)" in str(caught.value)


def test_long_dotdot_path_resolves_in_linear_time(root: Path) -> None:
    walk = f"{root}/" + "a/../" * 790
    assert len(walk) >= 3950
    assert len(walk + "../secret.bin") <= source.MAX_PATH_BYTES
    started = time.monotonic()
    assert opened(walk + "data.bin", peer(os.geteuid()), (root,)) == b"weights"
    with pytest.raises(AccessDenied, match="leads outside"):
        open_as_client(walk + "../secret.bin", peer(os.geteuid()), (root,), CLOSER)
    assert time.monotonic() - started < 0.5


def test_resolution_retries_when_the_kernel_cannot_prove_dotdot_stayed_beneath(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = source._openat2
    failures = [2]

    def flaky(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
        if failures[0]:
            failures[0] -= 1
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return real(dirfd, path, flags, resolve)

    monkeypatch.setattr(source, "_openat2", flaky)
    assert opened(root / "data.bin", peer(os.geteuid()), (root,)) == b"weights"
    failures[0] = 1000
    with pytest.raises(FileChanged, match="try again"):
        open_as_client(str(root / "data.bin"), peer(os.geteuid()), (root,), CLOSER)


def test_kernel_without_openat2_says_so(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*_args: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(source, "_openat2", missing)
    with pytest.raises(InvalidRequest, match="kernel lacks openat2"):
        open_as_client(str(root / "data.bin"), peer(os.geteuid()), (root,), CLOSER)


# credentials


def _fsuid_of_this_thread() -> int:
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[4])


def test_open_as_another_uid_gets_that_uids_access(root: Path) -> None:
    require_root()
    directory = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    groups, fsuid = os.getgroups(), _fsuid_of_this_thread()
    try:
        with pytest.raises(PermissionError):
            credentials.open_as(
                OTHER_UID,
                OTHER_UID,
                frozenset(),
                lambda: os.open("private.bin", os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory),
            )
        fd = credentials.open_as(
            OTHER_UID, OTHER_UID, frozenset(), lambda: os.open("data.bin", os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
        )
        assert os.pread(fd, 100, 0) == b"weights"
        os.close(fd)
    finally:
        os.close(directory)
    assert (os.getgroups(), _fsuid_of_this_thread()) == (groups, fsuid), "the caller's thread never switched"
    assert credentials._in_flight == {}


def test_an_open_as_a_client_runs_without_the_daemons_capabilities() -> None:
    """The thread that opens as a client has no effective capability left
    (a ptrace check on a /proc file, say, must see the client, not root);
    the caller's thread keeps its own."""
    require_root()
    seen: list[str] = []

    def action() -> int:
        with open("/proc/thread-self/status") as status:
            seen.extend(line.split()[1] for line in status if line.startswith("CapEff:"))
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    os.close(credentials.open_as(OTHER_UID, OTHER_UID, frozenset(), action))
    assert seen == ["0000000000000000"]
    with open("/proc/thread-self/status") as status:
        mine = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    assert int(mine, 16) != 0


def test_path_is_opened_with_the_clients_credentials(root: Path) -> None:
    require_root()
    client = peer(OTHER_UID)
    assert opened(root / "data.bin", client, (root,)) == b"weights"
    with pytest.raises(AccessDenied, match=f"uid {OTHER_UID} may not read .*private.bin"):
        open_as_client(str(root / "private.bin"), client, (root,), CLOSER)
    assert opened(root / "private.bin", peer(0), (root,)) == b"root only", "root's own loads still work"


def test_client_fd_is_reopened_only_with_the_clients_credentials(root: Path) -> None:
    """A client that was handed an fd of a file it may not open gets its
    bytes through that fd, but the daemon does not reopen the file for it."""
    require_root()
    private = from_client_fd(os.open(root / "private.bin", os.O_RDONLY | os.O_CLOEXEC), peer(OTHER_UID), CLOSER)
    public = from_client_fd(os.open(root / "data.bin", os.O_RDONLY | os.O_CLOEXEC), peer(OTHER_UID), CLOSER)
    own = from_client_fd(os.open(root / "private.bin", os.O_RDONLY | os.O_CLOEXEC), peer(0), CLOSER)
    try:
        assert private.direct_fd is None
        assert os.pread(private.buffered_fd, 100, 0) == b"root only"
        assert public.direct_fd is not None, "ext4 and tmpfs do O_DIRECT: the client may open this file"
        assert own.direct_fd is not None
        assert os.fstat(public.direct_fd).st_ino == os.fstat(public.buffered_fd).st_ino
    finally:
        for loaded in (private, public, own):
            loaded.close()


def test_daemon_that_is_not_root_never_acts_as_another_uid(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_args: object) -> int:
        raise AssertionError("switched credentials without being root")

    monkeypatch.setattr(credentials, "open_as", forbidden)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    loaded = from_client_fd(os.open(root / "data.bin", os.O_RDONLY | os.O_CLOEXEC), peer(OTHER_UID), CLOSER)
    try:
        assert loaded.direct_fd is None
        assert os.pread(loaded.buffered_fd, 100, 0) == b"weights"
    finally:
        loaded.close()
    with pytest.raises(AccessDenied, match="not root"):
        open_as_client(str(root / "data.bin"), peer(OTHER_UID), (root,), CLOSER)


@pytest.fixture
def hanging_open() -> Iterator[tuple[threading.Event, list[int]]]:
    """An action that blocks until released, then opens /dev/null."""
    release = threading.Event()
    fds: list[int] = []
    yield release, fds
    release.set()


def test_an_open_that_hangs_times_out_and_its_fd_is_closed_later(
    hanging_open: tuple[threading.Event, list[int]],
) -> None:
    require_root()
    release, fds = hanging_open
    finished = threading.Event()

    def action() -> int:
        release.wait(10)
        fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        finished.set()
        return fds[-1]

    with pytest.raises(OSError, match="took over") as caught:
        credentials.open_as(OTHER_UID, OTHER_UID, frozenset(), action, timeout=0.05)
    assert caught.value.errno == errno.ETIMEDOUT
    release.set()
    assert finished.wait(5)
    deadline = time.monotonic() + 5
    while credentials._in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert credentials._in_flight == {}
    assert not fd_is_open(fds[0]), "the abandoned open's fd was closed by its thread"


def test_one_uid_cannot_pile_up_hanging_opens(hanging_open: tuple[threading.Event, list[int]]) -> None:
    require_root()
    release, _ = hanging_open

    def action() -> int:
        release.wait(10)
        return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    for _ in range(credentials.MAX_OPENS_PER_UID):
        with pytest.raises(OSError, match="took over"):
            credentials.open_as(OTHER_UID, OTHER_UID, frozenset(), action, timeout=0.01)
    with pytest.raises(credentials.TooManyOpens):
        credentials.open_as(OTHER_UID, OTHER_UID, frozenset(), action, timeout=0.01)
    fd = credentials.open_as(OTHER_UID + 1, OTHER_UID + 1, frozenset(), lambda: os.open("/dev/null", os.O_RDONLY))
    os.close(fd)
    release.set()


def test_a_burst_of_quick_opens_waits_for_slots_instead_of_failing(root: Path) -> None:
    require_root()
    client = peer(OTHER_UID)
    results: list[bytes | BaseException] = []
    lock = threading.Lock()

    def load() -> None:
        try:
            outcome: bytes | BaseException = opened(root / "data.bin", client, (root,))
        except BaseException as error:
            outcome = error
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=load) for _ in range(4 * credentials.MAX_OPENS_PER_UID)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [b"weights"] * len(threads)
    assert credentials._in_flight == {}


# verification reads, never maps


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("test-source", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


@pytest.mark.parametrize(("offset", "length"), [(0, 3 << 20), (1, 1), (4095, (2 << 20) + 3), (12345, (1 << 20) - 1)])
def test_digest_of_file_is_the_sha256_of_the_range(offset: int, length: int) -> None:
    data = os.urandom((3 << 20) + 12345)
    fd = _memfd(data)
    try:
        expected = hashlib.sha256(data[offset : offset + length]).digest()
        assert _digest_of_file(fd, Piece(offset, offset % 4096, length)) == expected
    finally:
        os.close(fd)


def test_digest_of_a_file_truncated_before_hashing_is_file_changed() -> None:
    fd = _memfd(os.urandom(4 << 20))
    try:
        os.ftruncate(fd, 1 << 20)
        with pytest.raises(FileChanged, match="shrank while it was being verified"):
            _digest_of_file(fd, Piece(0, 0, 4 << 20))
    finally:
        os.close(fd)


HAMMER = textwrap.dedent(
    """
    import hashlib, json, os, threading
    from dmabufd.errors import FileChanged
    from dmabufd.loading.loader import _digest_of_file
    from dmabufd.loading.methods import Piece

    size = 8 << 20
    fd = os.memfd_create("hammered", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    stop = threading.Event()

    def truncate_in_a_loop():
        while not stop.is_set():
            os.ftruncate(fd, 4096)
            os.ftruncate(fd, size)

    truncator = threading.Thread(target=truncate_in_a_loop)
    truncator.start()
    outcomes = {"digest": 0, "changed": 0}
    try:
        for _ in range(300):
            try:
                digest = _digest_of_file(fd, Piece(0, 0, size))
            except FileChanged:
                outcomes["changed"] += 1
            else:
                assert len(digest) == hashlib.sha256().digest_size
                outcomes["digest"] += 1
    finally:
        stop.set()
        truncator.join()
    print(json.dumps(outcomes))
    """
)


@pytest.mark.timeout(120)
def test_digest_of_a_file_truncated_while_hashing_never_kills_the_process() -> None:
    """Under a mapping, the first truncation would be SIGBUS; a read
    comes up short instead, and the process lives."""
    result = subprocess.run([sys.executable, "-c", HAMMER], capture_output=True, text=True, timeout=110, check=False)
    assert result.returncode == 0, f"the hashing process died ({result.returncode}): {result.stderr[-2000:]}"
    outcomes = json.loads(result.stdout)
    assert outcomes["digest"] + outcomes["changed"] == 300
    assert outcomes["changed"] > 0, "the truncations did race the hashing"


def test_source_file_closes_the_fd_it_refuses(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_CLOEXEC)
    with pytest.raises(InvalidRequest):
        SourceFile(fd, "the directory", peer(os.geteuid()), CLOSER)
    assert not fd_is_open(fd)


# ---- which direct paths a file can take


def test_file_on_a_block_device_is_block_backed(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"w" * 8192)
    if os.major(path.stat().st_dev) == 0:
        pytest.fail(f"{tmp_path} is not on a block device here: this test needs one (the host's own disk)")
    loaded = SourceFile(os.open(path, os.O_RDONLY), "weights.bin", peer(os.getuid()), CLOSER)
    try:
        assert loaded.block_backed
        # ext4 on the host does O_DIRECT at 512 bytes or finer: the reopen is kept
        assert loaded.direct_fd is not None
    finally:
        loaded.close()


def test_memfd_is_not_block_backed_and_gets_no_direct_fd() -> None:
    fd = os.memfd_create("weights", os.MFD_CLOEXEC)
    os.write(fd, b"w" * 8192)
    loaded = SourceFile(fd, "a memfd", peer(os.getuid()), CLOSER)
    try:
        assert not loaded.block_backed
    finally:
        loaded.close()


def _route_with(methods: tuple[Method, ...]) -> HeapBackend:
    backend = MemfdBackend(HeapSpec("udmabuf-like", BackendKind.MEMFD, "/dev/null"))
    backend.load_methods = methods
    return backend


def test_auto_skips_direct_copy_file_range_for_a_file_not_on_a_block_device() -> None:
    fd = os.memfd_create("weights", os.MFD_CLOEXEC)
    os.write(fd, b"w" * 8192)
    loaded = SourceFile(fd, "a memfd", peer(os.getuid()), CLOSER)
    try:
        backend = _route_with((Method.DIRECT_CFR, Method.BUFFERED_READ))
        assert choose_method(backend, Method.AUTO, loaded) is Method.BUFFERED_READ
        with pytest.raises(InvalidRequest, match="needs a file on a block device"):
            choose_method(backend, Method.DIRECT_CFR, loaded)
    finally:
        loaded.close()


def test_auto_takes_direct_copy_file_range_for_a_file_on_a_block_device(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"w" * 8192)
    loaded = SourceFile(os.open(path, os.O_RDONLY), "weights.bin", peer(os.getuid()), CLOSER)
    try:
        backend = _route_with((Method.DIRECT_CFR, Method.BUFFERED_READ))
        assert choose_method(backend, Method.AUTO, loaded) is Method.DIRECT_CFR
    finally:
        loaded.close()


def test_dio_alignment_of_the_hosts_disk_and_of_tmpfs(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        alignment = uapi.dio_alignment(fd)
    finally:
        os.close(fd)
    assert alignment is not None
    assert alignment.direct
    assert alignment.offset <= 4096
    memfd = os.memfd_create("x", os.MFD_CLOEXEC)
    try:
        assert uapi.dio_alignment(memfd) is None  # tmpfs does not say (6.12)
    finally:
        os.close(memfd)
