"""The client processes of the security suite: hostile clients, and the
victim whose service an attack must not degrade.

Each actor is one function below, run by conftest.Actor in a process of
its own as the uid the test chooses (attackers run as an unprivileged uid,
so the kernel checks their permissions for real). Everything an actor
needs is imported at the top of this module, as root, before main() drops
privileges: on these machines the interpreter lives under /root (0700), so
a module imported after the switch would fail to load.

Actors talk JSON lines: events on stdout (Link.emit), commands on stdin
(Link.wait). Every actor ends with a "result" event.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import concurrent.futures.thread
import contextlib
import ctypes
import functools
import json
import math
import mmap
import os
import random
import secrets
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

import dmabufd_client
from dmabufd_client import Access, LoadedFile, Model
from dmabufd_common import fdwire
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.api.v1 import dmabufd_pb2_grpc as pb_grpc

ActorFn = Callable[..., None]
ACTORS: dict[str, ActorFn] = {}

# renameat2(2) flag: swap two names atomically.
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def actor(function: ActorFn) -> ActorFn:
    ACTORS[function.__name__] = function
    return function


class Link:
    """The actor's end of its pipes to the test."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields})
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def wait(self, command: str) -> dict[str, Any]:
        for line in sys.stdin:
            message: dict[str, Any] = json.loads(line)
            if message.get("command") == command:
                return message
        raise SystemExit(f"stdin closed while waiting for {command!r}")


def status_name(error: BaseException) -> str:
    """The gRPC status an error carries, by name."""
    if isinstance(error, dmabufd_client.DmabufdError):
        return error.status.name if error.status is not None else "CLIENT_SIDE"
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    if isinstance(error, grpc.Call):
        return error.code().name
    return type(error).__name__


def loaded_bytes(loaded: LoadedFile) -> bytes:
    """The file bytes a load delivered, in file order."""
    out = bytearray()
    for segment in sorted(loaded.segments, key=lambda s: s.file_offset):
        with loaded.buffer_of(segment).map(Access.READ) as mapping:
            view = mapping.memoryview
            out += view[segment.buffer_offset : segment.buffer_offset + segment.length]
            del view
    return bytes(out)


def model_bytes(model: Model) -> bytes:
    """Every tensor's bytes, in name order."""
    return b"".join(bytes(model[name].tobytes()) for name in sorted(model))


def outcome(call: Callable[[], object], keep_bytes: bool = True) -> dict[str, Any]:
    """Run one client call: its status, message, duration, and for a load
    the bytes of its buffers that were prepared memfds and (if
    `keep_bytes`) the bytes it delivered, hex-encoded."""
    began = time.monotonic()
    try:
        value = call()
    except dmabufd_client.DmabufdError as error:
        return {
            "status": status_name(error),
            "message": error.message[:600],
            "message_len": len(error.message),
            "seconds": time.monotonic() - began,
            "content": "",
        }
    seconds = time.monotonic() - began
    prepared = value.stats.prepared_bytes if isinstance(value, LoadedFile | Model) else 0
    content = b""
    if isinstance(value, LoadedFile) and keep_bytes:
        with value:
            content = loaded_bytes(value)
    elif isinstance(value, Model) and keep_bytes:
        with value:
            content = model_bytes(value)
    elif hasattr(value, "close"):
        value.close()
    return {
        "status": "OK",
        "message": "",
        "message_len": 0,
        "seconds": seconds,
        "content": content.hex(),
        "prepared": prepared,
    }


class RawSession:
    """An fd socket and a gRPC stub driven by hand, as a C client would."""

    def __init__(self, runtime_dir: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10)
        self.sock.connect(os.path.join(runtime_dir, fdwire.FD_SOCKET_NAME))
        data, fds, _ = fdwire.receive(self.sock)
        for fd in fds:
            os.close(fd)
        hello = fdwire.decode(data)
        if not isinstance(hello, fdwire.Hello):
            raise SystemExit(f"expected HELLO, got {hello!r}")
        self.token_hex = hello.token.hex()
        self.channel = grpc.insecure_channel(f"unix:{os.path.join(runtime_dir, fdwire.CONTROL_SOCKET_NAME)}")
        self.stub = pb_grpc.BufferServiceStub(self.channel)

    def ticket(self) -> bytes:
        """A fresh ticket, sent on the fd socket (raises OSError once the
        daemon has hung up)."""
        ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
        self.sock.send(fdwire.encode(fdwire.Ticket(ticket)))
        return ticket

    def metadata(self, ticket: bytes) -> tuple[tuple[str, str], ...]:
        return ((fdwire.SESSION_METADATA_KEY, self.token_hex), (fdwire.TICKET_METADATA_KEY, ticket.hex()))

    def close(self) -> None:
        self.channel.close()
        self.sock.close()


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile; 0 for no samples."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# -- the victim ----------------------------------------------------------------


@actor
def victim(link: Link, *, runtime_dir: str) -> None:
    """A well-behaved client: allocate 4 KiB and release it, in a loop,
    between "start" and "stop"; reports each cycle's latency. A cycle still
    stuck in the daemon at "stop" counts with the time it took so far."""
    client = dmabufd_client.connect(runtime_dir, timeout_s=10)
    for _ in range(10):  # the gRPC connection and the daemon's threads warm up
        client.allocate("4K").close()
    link.emit("ready")
    link.wait("start")
    samples: list[float] = []
    started_at: list[float] = []  # wall-clock start of each cycle, to match the daemon's log
    errors: collections.Counter[str] = collections.Counter()
    current: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            began = time.monotonic()
            current[:] = [began]
            started_at.append(time.time())
            try:
                client.allocate("4K").close()
            except dmabufd_client.DmabufdError as error:
                errors[status_name(error)] += 1
            samples.append(time.monotonic() - began)
            current.clear()
            if len(samples) % 20 == 0:
                link.emit("progress", calls=len(samples))

    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    link.emit("started")
    link.wait("stop")
    stop.set()
    worker.join(timeout=1.0)
    observed = list(samples)
    stuck = list(current)
    if worker.is_alive() and stuck:
        observed.append(time.monotonic() - stuck[0])
    slowest = sorted(zip(observed, started_at, strict=False), reverse=True)[:3]
    link.emit(
        "result",
        calls=len(observed),
        p50_ms=percentile(observed, 0.50) * 1e3,
        p99_ms=percentile(observed, 0.99) * 1e3,
        max_ms=max(observed, default=0.0) * 1e3,
        errors=dict(errors),
        slowest=[
            [round(seconds * 1e3, 1), time.strftime("%H:%M:%S", time.localtime(at)) + f"{at % 1:.3f}"[1:]]
            for seconds, at in slowest
        ],
    )
    os._exit(0)  # a cycle may still be stuck in the daemon: do not wait for it


# -- confused deputy -------------------------------------------------------------


def _open_for(path: str, open_as: str) -> int | None:
    flags = {"o_path": os.O_PATH, "rdonly": os.O_RDONLY, "wronly": os.O_WRONLY}
    if open_as == "by_path":
        return None
    return os.open(path, flags[open_as] | os.O_CLOEXEC)


def _load_once(client: dmabufd_client.Client, request: dict[str, Any], deadline_s: float) -> dict[str, Any] | None:
    """One request of loads(); None if it is still running after `deadline_s`."""
    fd = _open_for(request["path"], request["open_as"])

    method = request.get("method", "auto")

    def call() -> object:
        if request.get("api") == "model":
            return client.load_model(request["path"], by_path=True) if fd is None else client.load_model(fd)
        if fd is None:
            return client.load_file(request["path"], by_path=True, method=method)
        return client.load_file(fd, method=method)

    keep_bytes = request.get("keep_bytes", True)
    finished: list[dict[str, Any]] = []
    worker = threading.Thread(target=lambda: finished.append(outcome(call, keep_bytes)), daemon=True)
    worker.start()
    worker.join(timeout=deadline_s)
    if not finished:
        return None
    if fd is not None:
        os.close(fd)
    return finished[0]


@actor
def loads(link: Link, *, runtime_dir: str, requests: list[dict[str, Any]], deadline_s: float = 60.0) -> None:
    """LoadFile or LoadModel (request "api": "file" | "model") of each
    request's "path": by an fd this process opened ("open_as": "o_path",
    "rdonly", "wronly") or by path ("by_path"), LoadFile with the request's
    "method" (default auto). Reports each outcome with the bytes that
    reached this process (unless the request says "keep_bytes": false). Gives up on a load (status
    TIMEOUT, and no further loads) after `deadline_s`."""
    client = dmabufd_client.connect(runtime_dir)
    results: list[dict[str, Any]] = []
    for request in requests:
        began = time.monotonic()
        result = _load_once(client, request, deadline_s)
        if result is None:
            seconds = time.monotonic() - began
            results.append({"status": "TIMEOUT", "message": "", "message_len": 0, "seconds": seconds, "content": ""})
            link.emit("result", outcomes=results)
            os._exit(0)  # the load is still stuck in the daemon
        results.append(result)
    link.emit("result", outcomes=results)


@actor
def load_after_chmod(link: Link, *, runtime_dir: str, path: str) -> None:
    """Open a file it may read, let the test take that right away (chmod,
    replace the path), then load through the fd it holds."""
    client = dmabufd_client.connect(runtime_dir)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    link.emit("opened")
    link.wait("load")
    readable = os.access(path, os.R_OK)
    link.emit("result", **outcome(lambda: client.load_file(fd)), path_readable_now=readable)


@actor
def path_loads(link: Link, *, runtime_dir: str, paths: list[str]) -> None:
    """LoadFile by path, one call per path."""
    client = dmabufd_client.connect(runtime_dir)
    results = [outcome(functools.partial(client.load_file, path, by_path=True)) for path in paths]
    link.emit("result", outcomes=results)


def _exchange(a: str, b: str) -> bool:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE)."""
    return int(_libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE)) == 0


@actor
def symlink_race(link: Link, *, runtime_dir: str, home: str, outside: str, attempts: int) -> None:
    """In `home`, a directory of the loading root this uid owns: `d/f` is a
    benign file and `s` a symlink to the directory `outside`. A thread keeps
    swapping `d` and `s` while the main thread loads `home/d/f` by path
    `attempts` times: a daemon that checks the path, then opens it again,
    opens the outside file when the swap lands between the two."""
    client = dmabufd_client.connect(runtime_dir)
    benign = b"benign " * 600
    outside_bytes = Path(outside, "f").read_bytes()
    os.mkdir(os.path.join(home, "d"))
    Path(home, "d", "f").write_bytes(benign)
    os.symlink(outside, os.path.join(home, "s"))
    d, s = os.path.join(home, "d"), os.path.join(home, "s")
    if not _exchange(d, s) or not _exchange(d, s):
        raise SystemExit(f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(ctypes.get_errno())}")
    stop = threading.Event()
    swaps = [0]

    def swap() -> None:
        while not stop.is_set():
            _exchange(d, s)
            swaps[0] += 1

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(attempts):
        result = outcome(lambda: client.load_file(os.path.join(d, "f"), by_path=True))
        content = bytes.fromhex(result["content"])
        if result["status"] != "OK":
            counts[result["status"]] += 1
        elif content == benign:
            counts["benign"] += 1
        elif content == outside_bytes:
            counts["outside"] += 1
        else:
            counts["other bytes"] += 1
    stop.set()
    swapper.join()
    link.emit("result", counts=dict(counts), swaps=swaps[0])


# -- signals ----------------------------------------------------------------------


@actor
def truncating_loads(link: Link, *, runtime_dir: str, attempts: int, size: int) -> None:
    """Load its own memfd with verify=True while a thread truncates it to 0
    and grows it back, over and over: a daemon that maps the file to
    verify it takes SIGBUS when the pages vanish under the mapping."""
    client = dmabufd_client.connect(runtime_dir)
    fd = os.memfd_create("truncated-under-load", os.MFD_CLOEXEC)
    os.write(fd, os.urandom(size))
    stop = threading.Event()
    truncations = [0]

    def truncate() -> None:
        # Mostly whole (so a copy often completes and verification starts),
        # briefly empty (the pages vanish under whoever maps the file).
        # The pauses also keep this thread off the CPU others need.
        while not stop.is_set():
            time.sleep(random.uniform(0.01, 0.05))
            os.ftruncate(fd, 0)
            time.sleep(0.002)
            os.ftruncate(fd, size)
            truncations[0] += 1

    truncator = threading.Thread(target=truncate, daemon=True)
    truncator.start()
    statuses = [outcome(lambda: client.load_file(fd, verify=True), keep_bytes=False)["status"] for _ in range(attempts)]
    stop.set()
    truncator.join()
    link.emit("result", statuses=statuses, truncations=truncations[0])


# -- fd exhaustion --------------------------------------------------------------


@actor
def grant_abuse(link: Link, *, runtime_dir: str, cycles: int, warmup_cycles: int) -> None:
    """Grants that would make the daemon send (or hold) fds without bound:
    one buffer named 30 000 times, more distinct buffers than a grant may
    name, then many read-only grants of the same buffers, each redeemed.
    Pauses ("warm", "cycled") so the test can count the daemon's fds."""
    owner = dmabufd_client.connect(runtime_dir)
    receiver = dmabufd_client.connect(runtime_dir)
    one = owner.allocate("4K")
    repeated = outcome(lambda: owner.grant([one] * 30_000))
    many = owner.allocate_batch("4K", 257)
    too_many = outcome(lambda: owner.grant(many))
    shared = owner.allocate_batch("4K", 8)

    def cycle() -> None:
        grant = owner.grant(shared, read_only=True)
        with receiver.redeem(grant.token) as received:
            assert received.read_only
            assert len(received.buffers) == len(shared)

    for _ in range(warmup_cycles):
        cycle()
    link.emit("warm")
    link.wait("continue")
    for _ in range(cycles - warmup_cycles):
        cycle()
    link.emit("cycled")
    link.wait("finish")
    link.emit("result", repeated=repeated, too_many=too_many)


def _first_frame(sock: socket.socket, timeout_s: float) -> str:
    """What the daemon said first on a new connection: HELLO, ERROR <code>,
    CLOSED (hung up without a word) or SILENT (nothing yet)."""
    sock.settimeout(timeout_s)
    try:
        data, fds, _ = fdwire.receive(sock)
    except TimeoutError:
        return "SILENT"
    except OSError:
        return "CLOSED"
    for fd in fds:
        os.close(fd)
    if not data:
        return "CLOSED"
    try:
        frame = fdwire.decode(data)
    except fdwire.FrameError:
        return "GARBAGE"
    if isinstance(frame, fdwire.Hello):
        return "HELLO"
    if isinstance(frame, fdwire.ErrorFrame):
        return f"ERROR {frame.code}"
    return type(frame).__name__


def _closed_after(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the daemon hangs up (EOF) within `timeout_s`."""
    sock.settimeout(timeout_s)
    try:
        while True:
            data, fds, _ = fdwire.receive(sock)
            for fd in fds:
                os.close(fd)
            if not data and not fds:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


@actor
def connection_flood(link: Link, *, runtime_dir: str, count: int) -> None:
    """Open `count` fd-socket connections and keep every one the daemon
    accepts; report what each was told, and whether refused ones were
    closed. Holds its sessions until "release"."""
    path = os.path.join(runtime_dir, fdwire.FD_SOCKET_NAME)
    kept: list[socket.socket] = []
    told: collections.Counter[str] = collections.Counter()
    refused_and_closed = 0
    began = time.monotonic()
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(5)
        try:
            sock.connect(path)
        except OSError as error:
            told[f"connect: {error.strerror or error}"] += 1
            sock.close()
            continue
        first = _first_frame(sock, 5)
        told[first] += 1
        if first == "HELLO":
            kept.append(sock)
        else:
            refused_and_closed += _closed_after(sock, 2)
            sock.close()
    link.emit("holding", told=dict(told), refused_and_closed=refused_and_closed, seconds=time.monotonic() - began)
    link.wait("release")
    for sock in kept:
        sock.close()
    link.emit("result")


@actor
def fd_limit_flood(link: Link, *, runtime_dir: str, limit: int, give_up_after: int) -> None:
    """Connect to the fd socket until the daemon stops greeting new
    connections (it has run out of fds): `give_up_after` connections in a
    row without a HELLO, or a connect that blocks (the backlog is full).
    Holds every connection until "release"."""
    path = os.path.join(runtime_dir, fdwire.FD_SOCKET_NAME)
    held: list[socket.socket] = []
    told: collections.Counter[str] = collections.Counter()
    without_hello = 0
    for _ in range(limit):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(1)
        try:
            sock.connect(path)
        except OSError as error:
            told[f"connect: {error.strerror or 'timed out'}"] += 1
            sock.close()
            break
        first = _first_frame(sock, 0.5)
        told[first] += 1
        held.append(sock)
        without_hello = 0 if first == "HELLO" else without_hello + 1
        if without_hello >= give_up_after:
            break
    link.emit("holding", told=dict(told))
    link.wait("release")
    for sock in held:
        sock.close()
    link.emit("result")


# -- aliasing ---------------------------------------------------------------------


@actor
def redeem(link: Link, *, runtime_dir: str) -> None:
    """Connect, wait for a grant token ("redeem" command), redeem it; report
    the inodes and first bytes received."""
    client = dmabufd_client.connect(runtime_dir)
    token = str(link.wait("redeem")["token"])
    began = time.monotonic()
    try:
        received = client.redeem(token)
    except dmabufd_client.DmabufdError as error:
        link.emit("result", status=status_name(error), message=error.message[:600], seconds=time.monotonic() - began)
        return
    inodes = [buffer.info.inode for buffer in received.buffers]
    heads = []
    for buffer in received.buffers:
        with buffer.map(Access.READ) as mapping:
            heads.append(bytes(mapping.memoryview[:16]).hex())
    received.close()
    link.emit("result", status="OK", message="", seconds=time.monotonic() - began, inodes=inodes, heads=heads)


@actor
def mapped_receiver(link: Link, *, runtime_dir: str) -> None:
    """Redeem a grant token ("redeem"), map every buffer read-write and
    close the fds, keeping only the mappings (made with libc's mmap:
    Python's mmap keeps a dup of the fd); on "peek", read each mapping's
    first 16 bytes, then overwrite them with b"EVIL"."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    client = dmabufd_client.connect(runtime_dir)
    token = str(link.wait("redeem")["token"])
    received = client.redeem(token)
    addresses: list[int] = []
    for buffer in received.buffers:
        address = libc.mmap(None, buffer.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, buffer.fileno(), 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        addresses.append(address)
    inodes = [buffer.info.inode for buffer in received.buffers]
    received.close()
    link.emit("mapped", inodes=inodes)
    link.wait("peek")
    heads = [ctypes.string_at(address, 16).hex() for address in addresses]
    for address in addresses:
        ctypes.memmove(address, b"EVIL", 4)
    link.emit("result", heads=heads)


@actor
def hold_granted(link: Link, *, runtime_dir: str) -> None:
    """Connect ("connected"), redeem the grant named by "redeem" and keep
    its fds ("holding"), close them on "let-go"."""
    client = dmabufd_client.connect(runtime_dir)
    link.emit("connected")
    grant_id = int(link.wait("redeem")["grant_id"])
    received = client.redeem(grant_id=grant_id)
    link.emit("holding", buffers=len(received.buffers))
    link.wait("let-go")
    received.close()
    link.emit("result")


@actor
def grant_release_reallocate(link: Link, *, runtime_dir: str, to_uid: int, size: str, recover_s: float) -> None:
    """Allocate `size` (the whole quota), grant it to `to_uid` ("granted"),
    and on "release" release it and allocate `size` again ("while-held").
    On "after", try again until it works (at most `recover_s`)."""
    client = dmabufd_client.connect(runtime_dir)
    buffer = client.allocate(size)
    grant = client.grant([buffer], to_uid=to_uid)
    link.emit("granted", grant_id=grant.id)
    link.wait("release")
    buffer.close()
    link.emit("while-held", outcome=outcome(lambda: client.allocate(size)))
    link.wait("after")
    let_go = time.monotonic()
    after = outcome(lambda: client.allocate(size))
    while after["status"] != "OK" and time.monotonic() - let_go < recover_s:
        time.sleep(0.1)
        after = outcome(lambda: client.allocate(size))
    link.emit("result", after=after, recovered_after_s=time.monotonic() - let_go)


def _lingering_socket() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP socket whose close() blocks: SO_LINGER for an hour and
    unsent data behind a peer that never reads (a zero window). Returns
    (it, the peer); resetting the peer lets a close return."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stuck.connect(server.getsockname())
    peer, _ = server.accept()
    server.close()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + (3600).to_bytes(4, "little"))
    stuck.setblocking(False)
    with contextlib.suppress(BlockingIOError):  # full: the peer's window is closed
        while True:
            stuck.send(b"x" * 65536)
    return stuck, peer


def _reset(peer: socket.socket) -> None:
    """Close a lingering socket's peer with a reset: its close returns."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    peer.close()


def _fd_session(runtime_dir: str) -> tuple[socket.socket, str]:
    """A raw connection to the fd socket, and what it first received."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(Path(runtime_dir) / fdwire.FD_SOCKET_NAME))
    return sock, _first_frame(sock, 5.0)


@actor
def blocking_closes(link: Link, *, runtime_dir: str, sockets: int) -> None:
    """Give the daemon `sockets` files whose close blocks, as FILE frames
    (deposits, 12 per session), closing this process's copies, then hang
    up each session: the daemon holds the last reference of each and lets
    go of them as the sessions end. Then try new sessions until one is
    refused, for at most 10 s ("stuck"). On "release", reset the files'
    peers so the closes return, and try a new session again."""
    peers: list[socket.socket] = []
    hello = ""
    left = sockets
    while left:
        session, first = _fd_session(runtime_dir)
        hello = hello or first
        if not first.startswith("HELLO"):  # refused already: enough is stuck
            session.close()
            break
        for _ in range(min(left, 12)):
            stuck, peer = _lingering_socket()
            try:
                session.sendmsg(
                    [fdwire.encode(fdwire.FileTicket(secrets.token_bytes(fdwire.TICKET_BYTES)))],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, stuck.fileno().to_bytes(4, "little"))],
                )
            except OSError:  # the daemon ended the session: enough is stuck
                _reset(peer)  # this copy is the last: let its close return
                stuck.close()
                left = 0
                break
            peers.append(peer)
            stuck.close()  # before the session ends: the daemon's reference is the last
            left -= 1
        session.close()
    began = time.monotonic()
    refused = ""
    while time.monotonic() - began < 10.0 and not refused.startswith("ERROR"):
        probe, refused = _fd_session(runtime_dir)
        probe.close()
        time.sleep(0.1)
    link.emit("refused", hello=hello, new_session=refused)
    link.wait("flood")
    for _ in range(200):  # refused connections with nothing in them: closed at once, not queued
        probe, _ = _fd_session(runtime_dir)
        probe.close()
    link.emit("stuck")
    link.wait("release")
    for peer in peers:
        _reset(peer)
    released = time.monotonic()
    first = ""
    while time.monotonic() - released < 10.0:
        again, first = _fd_session(runtime_dir)
        again.close()
        if first.startswith("HELLO"):
            break
        time.sleep(0.1)
    link.emit("result", after_release=first, seconds=time.monotonic() - released)


@actor
def pool_partial_release(link: Link, *, runtime_dir: str, fourcc: str, width: int, height: int, count: int) -> None:
    """Allocate a recycled pool, release ONE of its buffers as if it were a
    lone buffer, then end the session with the pool still held (its fds
    closed), so the daemon retires the pool to its warm cache."""
    client = dmabufd_client.connect(runtime_dir)
    pool = client.allocate_pool(fourcc, width, height, count, recycle=True, name="aliasc")
    lone = outcome(lambda: client.release([pool.buffers[0].id]))
    for buffer in pool.buffers:
        os.close(buffer.detach())
    client.close()
    link.emit("result", release=lone, buffers=len(pool.buffers))


@actor
def pool_frames(link: Link, *, runtime_dir: str, fourcc: str, width: int, height: int, count: int) -> None:
    """A new session of the same uid: allocate the same recycled pool and
    write then read back every frame."""
    client = dmabufd_client.connect(runtime_dir)
    try:
        pool = client.allocate_pool(fourcc, width, height, count, recycle=True)
    except dmabufd_client.DmabufdError as error:
        link.emit("result", allocate=status_name(error), message=error.message[:600], recycled=False, frames_ok=0)
        return
    frames_ok = 0
    for index, buffer in enumerate(pool.buffers):
        pattern = f"frame {index:04d}".encode()
        try:
            with buffer.map(Access.RW) as mapping:
                view = mapping.memoryview
                view[: len(pattern)] = pattern
                frames_ok += bytes(view[: len(pattern)]) == pattern
                del view
        except (OSError, ValueError):
            pass  # not a buffer any more: a closed or reused fd was handed out
    recycled = pool.recycled
    frames = len(pool.buffers)
    pool.close()
    link.emit("result", allocate="OK", message="", recycled=recycled, frames_ok=frames_ok, frames=frames)


# -- stalls -------------------------------------------------------------------------


@actor
def unread_allocations(link: Link, *, runtime_dir: str, calls: int, buffers: int, workers: int, stall_s: float) -> None:
    """Allocate `buffers` buffers `calls` times from `workers` threads,
    never reading the fd socket the buffers are sent on (one frame per
    call); then wait (without reading) for the daemon to hang up, and make
    one more call. Calls not started within stall_s + 4 s are not made
    (NOT ISSUED): the daemon is stalled."""
    session = RawSession(runtime_dir)
    statuses: collections.Counter[str] = collections.Counter()
    first_unread: list[float] = []
    lock = threading.Lock()
    began = time.monotonic()

    def one(_: int) -> None:
        if time.monotonic() - began > stall_s + 4:
            with lock:
                statuses["NOT ISSUED"] += 1
            return
        try:
            ticket = session.ticket()
        except OSError:
            ticket = secrets.token_bytes(fdwire.TICKET_BYTES)  # the daemon hung up already
        try:
            request = pb.AllocateRequest(size=4096, count=buffers)
            session.stub.Allocate(request, metadata=session.metadata(ticket), timeout=stall_s + 4)
            status = "OK"
        except grpc.RpcError as error:
            status = status_name(error)
        with lock:
            statuses[status] += 1
            if status == "OK" and not first_unread:
                first_unread.append(time.monotonic())

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, range(calls)))
    calls_seconds = time.monotonic() - began
    since = first_unread[0] if first_unread else began
    poller = select.poll()
    poller.register(session.sock, select.POLLRDHUP | select.POLLHUP)
    hangup_after: float | None = None
    while time.monotonic() < since + stall_s + 6:
        if poller.poll(50):
            hangup_after = time.monotonic() - since
            break
    try:
        ticket = session.ticket()
    except OSError:
        ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
    try:
        session.stub.ListBuffers(pb.ListBuffersRequest(), metadata=session.metadata(ticket), timeout=5)
        next_call = "OK"
    except grpc.RpcError as error:
        next_call = status_name(error)
    link.emit(
        "result",
        statuses=dict(statuses),
        calls_seconds=calls_seconds,
        hangup_after_s=hangup_after,
        next_call=next_call,
    )


@actor
def allocate_frame_flood(link: Link, *, runtime_dir: str, requests: int, stall_s: float) -> None:
    """ALLOCATE frames straight on the fd socket, as a C client could send
    them. First `requests` the daemon must refuse (bytes that are no
    protobuf, a batch, an absurd size), reading each REPLY; then as many
    valid ones as the socket takes, never reading the fds and REPLYs they
    bring; then wait (without reading) for the daemon to hang up."""
    session = RawSession(runtime_dir)
    sock = session.sock
    bodies = [
        b"\xff\xff\xff\xff",
        pb.AllocateRequest(size=4096, count=2).SerializeToString(),
        pb.AllocateRequest(size=2**62).SerializeToString(),
    ]
    refused: collections.Counter[str] = collections.Counter()
    others = 0
    for index in range(requests):
        ticket = secrets.token_bytes(fdwire.TICKET_BYTES)
        sock.send(fdwire.encode(fdwire.AllocateFrame(ticket, bodies[index % len(bodies)])))
        while True:
            data, fds, _ = fdwire.receive(sock)
            for fd in fds:
                os.close(fd)
            frame = fdwire.decode(data)
            if isinstance(frame, fdwire.Reply) and frame.ticket == ticket:
                refused[next(code.name for code in grpc.StatusCode if code.value[0] == frame.code)] += 1
                break
            others += 1
    sock.setblocking(False)
    valid = pb.AllocateRequest(size=4096).SerializeToString()
    sent = 0
    began = time.monotonic()
    writable = select.poll()
    writable.register(sock, select.POLLOUT)
    # Until the daemon stops reading for good: a full socket only means it
    # is behind. Its REPLYs first fill its own send buffer (a few hundred
    # fit), and only then wait unread in its outbox, so the flood must
    # outlast that buffer for the outbox limit to be reached at all.
    while sent < requests * 10 and time.monotonic() < began + stall_s:
        try:
            sock.send(fdwire.encode(fdwire.AllocateFrame(secrets.token_bytes(fdwire.TICKET_BYTES), valid)))
        except BlockingIOError:
            if not writable.poll(1000):
                break  # the daemon stopped reading: it has ended the session or will
            continue
        except OSError:
            break  # it hung up already
        sent += 1
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP | select.POLLHUP)
    hangup_after: float | None = None
    while time.monotonic() < began + stall_s + 6:
        if poller.poll(50):
            hangup_after = time.monotonic() - began
            break
    link.emit("result", refused=dict(refused), others=others, sent=sent, hangup_after_s=hangup_after)


def _drain(sock: socket.socket, frames: collections.Counter[str]) -> None:
    """Read (and close) whatever the daemon sends until it hangs up."""
    sock.settimeout(None)
    while True:
        try:
            data, fds, _ = fdwire.receive(sock)
        except OSError:
            return
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            return
        frames["ERROR" if data[5:6] == bytes([fdwire.FrameType.ERROR]) else "other"] += 1


@actor
def watch_flood(link: Link, *, runtime_dir: str, count: int, first_message_s: float) -> None:
    """Open up to `count` WatchHeaps streams in one session, one after the
    other, and never read past their first message. (The fd socket is
    drained, so only the streams are at stake.) A stream whose first
    message does not come within `first_message_s` ends the flood: the
    daemon is stalled already. Reports how each stream started; holds
    them until "cancel"."""
    session = RawSession(runtime_dir)
    frames: collections.Counter[str] = collections.Counter()
    drainer = threading.Thread(target=_drain, args=(session.sock, frames), daemon=True)
    drainer.start()
    control = os.path.join(runtime_dir, fdwire.CONTROL_SOCKET_NAME)

    async def first_message(call: Any) -> str:
        try:
            message = await asyncio.wait_for(call.read(), first_message_s)
        except TimeoutError:
            return "SILENT"
        except grpc.aio.AioRpcError as error:
            return error.code().name
        return "STREAMING" if isinstance(message, pb.HeapEvent) else "ENDED"

    async def run() -> dict[str, int]:
        channel = grpc.aio.insecure_channel(f"unix:{control}")
        stub = pb_grpc.BufferServiceStub(channel)
        calls = []
        started: collections.Counter[str] = collections.Counter()
        for _ in range(count):
            try:
                ticket = session.ticket()
            except OSError:
                started["SESSION ENDED"] += 1
                break
            call = stub.WatchHeaps(pb.WatchHeapsRequest(include_existing=True), metadata=session.metadata(ticket))
            calls.append(call)
            how = await first_message(call)
            started[how] += 1
            if how == "SILENT":
                break
        started["NOT ATTEMPTED"] = count - sum(started.values())
        link.emit("opened", started={k: v for k, v in started.items() if v})
        await asyncio.get_running_loop().run_in_executor(None, link.wait, "cancel")
        for call in calls:
            call.cancel()
        await channel.close(None)
        return dict(started)

    started = asyncio.run(run())
    session.close()
    link.emit("result", started=started, fd_socket_frames=dict(frames))


@actor
def ticketless_calls(link: Link, *, runtime_dir: str, count: int, timeout_s: float) -> None:
    """`count` concurrent calls with this session's token and tickets that
    were never sent: each makes the daemon wait for a ticket in vain."""
    session = RawSession(runtime_dir)
    link.emit("ready")
    link.wait("fire")
    began = time.monotonic()
    futures = [
        session.stub.ListBuffers.future(
            pb.ListBuffersRequest(),
            metadata=session.metadata(secrets.token_bytes(fdwire.TICKET_BYTES)),
            timeout=timeout_s,
        )
        for _ in range(count)
    ]
    statuses: collections.Counter[str] = collections.Counter()
    for future in futures:
        try:
            future.result()
            statuses["OK"] += 1
        except grpc.RpcError as error:
            statuses[status_name(error)] += 1
    link.emit("result", statuses=dict(statuses), seconds=time.monotonic() - began)


# -- budgets -------------------------------------------------------------------------


def _memfds() -> set[int]:
    """This process's fds that are memfds."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:"):
                found.add(int(name))
    return found


@actor
def model_kept(link: Link, *, runtime_dir: str, first: str, second: str, recover_s: float) -> None:
    """Load the model at `first`, keep copies of its buffers' fds, release
    the model, and load the model at `second` (together more than the
    quota). Then close the copies and try again until it works (at most
    `recover_s`)."""
    client = dmabufd_client.connect(runtime_dir)
    before = _memfds()
    model = client.load_model(first)
    kept = [os.dup(fd) for fd in _memfds() - before]
    model.close()
    while_held = outcome(lambda: client.load_model(second).close())
    for fd in kept:
        os.close(fd)
    let_go = time.monotonic()
    after = outcome(lambda: client.load_model(second).close())
    while after["status"] != "OK" and time.monotonic() - let_go < recover_s:
        time.sleep(0.1)
        after = outcome(lambda: client.load_model(second).close())
    link.emit("result", kept=len(kept), while_held=while_held, after=after, recovered_after_s=time.monotonic() - let_go)


@actor
def quota_kept(link: Link, *, runtime_dir: str, size: str, hold: str, recover_s: float) -> None:
    """Allocate a whole quota, release it in the daemon's books but keep
    the memory (an open fd, or only a mapping), and allocate the quota
    again. Then let go, and try until it works (at most `recover_s`)."""
    client = dmabufd_client.connect(runtime_dir)
    buffer = client.allocate(size)
    region: mmap.mmap | None = None
    if hold == "mapping":
        region = mmap.mmap(buffer.fileno(), buffer.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        region[:5] = b"still"
    buffer_id = buffer.id
    fd = buffer.detach()
    client.release([buffer_id])
    if region is not None:
        os.close(fd)
    while_held = outcome(lambda: client.allocate(size))
    if region is not None:
        region.close()
    else:
        os.close(fd)
    let_go = time.monotonic()
    after = outcome(lambda: client.allocate(size))
    while after["status"] != "OK" and time.monotonic() - let_go < recover_s:
        time.sleep(0.1)
        after = outcome(lambda: client.allocate(size))
    link.emit("result", while_held=while_held, after=after, recovered_after_s=time.monotonic() - let_go)


# -- bounded errors ------------------------------------------------------------------


@actor
def oversized_arguments(link: Link, *, runtime_dir: str, long_path: str) -> None:
    """A 100 KB buffer name, a 100 KB path, a 100 KB grant token."""
    client = dmabufd_client.connect(runtime_dir)
    outcomes = {
        "name": outcome(lambda: client.allocate("4K", name="n" * 100_000)),
        "path": outcome(lambda: client.load_file(long_path, by_path=True)),
        "token": outcome(lambda: client.redeem("ab" * 50_000)),
    }
    link.emit("result", **outcomes)


def main() -> None:
    """argv: uid, actor name, JSON keyword arguments. Reports "loaded" once
    the interpreter is up and the uid switched, then waits for "go" (so
    the start-up's CPU burst stays out of the victim's measurements)."""
    uid, name, kwargs = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    if uid != os.getuid():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if (os.getuid(), os.geteuid(), os.getgid(), os.getgroups()) != (uid, uid, uid, []):
            raise SystemExit(f"could not become uid {uid}")
    link = Link()
    link.emit("loaded", uid=os.getuid())
    link.wait("go")
    ACTORS[name](link, **kwargs)
