"""Listening sockets handed over by a service manager.

Android's init creates the sockets a service's .rc names (`socket NAME
stream+listen ...` makes /dev/socket/NAME) and passes each one's fd in
ANDROID_SOCKET_NAME; systemd passes the sockets of the .socket units at
fds 3, 4, ... with LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES (the
FileDescriptorName= of each). Either way the daemon serves on sockets it
did not create: the manager chose their paths, modes, owners and labels,
and keeps them across restarts of the daemon.

The names are CONTROL_ACTIVATION_NAME and FD_ACTIVATION_NAME in
dmabufd_common.paths. Both sockets come from the manager, or neither does
(the daemon then creates them in its runtime directory). Every inherited
fd is checked before it is used: a socket, AF_UNIX, of the right type,
already listening. Anything else stops the daemon with an ActivationError
that names the variable and says what is wrong, since serving on the wrong
fd would fail later and much less clearly.

The variables are removed from the environment as they are read (also
when they are ignored or wrong), and the fds are made close-on-exec, so
nothing the daemon might start inherits them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

from dmabufd_common.paths import ANDROID_SOCKET_ENV_PREFIX, CONTROL_ACTIVATION_NAME, FD_ACTIVATION_NAME

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # systemd's SD_LISTEN_FDS_START
SYSTEMD_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# What each socket must be, by name.
EXPECTED_TYPES = {
    CONTROL_ACTIVATION_NAME: socket.SOCK_STREAM,
    FD_ACTIVATION_NAME: socket.SOCK_SEQPACKET,
}
_TYPE_NAMES = {
    socket.SOCK_STREAM: "SOCK_STREAM",
    socket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
    socket.SOCK_DGRAM: "SOCK_DGRAM",
}
_RC_TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_SEQPACKET: "seqpacket"}
_UNIT_DIRECTIVES = {socket.SOCK_STREAM: "ListenStream=", socket.SOCK_SEQPACKET: "ListenSequentialPacket="}


class ActivationError(RuntimeError):
    """The service manager handed over something the daemon cannot serve on."""


@dataclass(frozen=True)
class InheritedSockets:
    control: socket.socket  # gRPC, listening, non-blocking, close-on-exec
    fd: socket.socket  # the fd socket, the same
    manager: str  # "init" or "systemd", for the log

    def describe(self, which: socket.socket) -> str:
        """Where a socket is bound, as clients reach it."""
        try:
            name = which.getsockname()
        except OSError:
            name = ""
        if isinstance(name, bytes):  # an abstract address
            name = "@" + name.lstrip(b"\0").decode("utf-8", "replace")
        return f"{name or '(unbound)'} (from {self.manager})"


@dataclass(frozen=True)
class _Candidate:
    fd: int
    origin: str  # the variable, as the error messages name it
    manager: str


def take_inherited_sockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> InheritedSockets | None:
    """The two listening sockets the service manager passed, checked and
    ready for the event loop; None when it passed none. Raises
    ActivationError when what it passed cannot be used."""
    env = os.environ if environ is None else environ
    own_pid = os.getpid() if pid is None else pid
    from_init = _from_init(env)
    from_systemd = _from_systemd(env, own_pid)
    if from_init and from_systemd:
        raise ActivationError(
            f"both init ({', '.join(c.origin for c in from_init.values())}) and systemd "
            f"({', '.join(c.origin for c in from_systemd.values())}) passed dmabufd sockets; pass them one way"
        )
    found = from_init or from_systemd
    if not found:
        return None
    missing = [name for name in EXPECTED_TYPES if name not in found]
    if missing:
        given = next(iter(found.values()))
        raise ActivationError(
            f"{given.manager} passed {given.origin} but not the socket named {missing[0]!r}: "
            f"dmabufd needs both {CONTROL_ACTIVATION_NAME!r} (stream) and {FD_ACTIVATION_NAME!r} (seqpacket) "
            "from the service manager, or neither"
        )
    control, fds = found[CONTROL_ACTIVATION_NAME], found[FD_ACTIVATION_NAME]
    if control.fd == fds.fd:
        raise ActivationError(f"{control.origin} and {fds.origin} are the same fd; dmabufd needs two sockets")
    adopted: list[socket.socket] = []
    try:
        for name, expected in EXPECTED_TYPES.items():
            adopted.append(_adopt(found[name], expected))
    except BaseException:
        for sock in adopted:
            sock.close()
        raise
    return InheritedSockets(adopted[0], adopted[1], found[CONTROL_ACTIVATION_NAME].manager)


def _from_init(env: MutableMapping[str, str]) -> dict[str, _Candidate]:
    found: dict[str, _Candidate] = {}
    for name in EXPECTED_TYPES:
        variable = ANDROID_SOCKET_ENV_PREFIX + name
        value = env.pop(variable, None)
        if value is None:
            continue
        origin = f"{variable}={value!r}"
        if not (value.isascii() and value.isdigit()):
            raise ActivationError(f"{origin} is not a file descriptor number (init sets it to the fd in decimal)")
        found[name] = _Candidate(int(value), origin, "init")
    return found


def _from_systemd(env: MutableMapping[str, str], own_pid: int) -> dict[str, _Candidate]:
    listen_pid, count_text, names_text = (env.pop(variable, None) for variable in SYSTEMD_VARIABLES)
    if count_text is None:
        return {}
    if listen_pid is None:
        # sd_listen_fds() does the same: without LISTEN_PID nobody can
        # tell whom the fds were meant for.
        log.warning("LISTEN_FDS is set without LISTEN_PID: ignoring it and creating the sockets")
        return {}
    if not (listen_pid.isascii() and listen_pid.isdigit()):
        raise ActivationError(f"LISTEN_PID={listen_pid!r} is not a process id")
    if int(listen_pid) != own_pid:
        # Variables a parent inherited and passed on by mistake: the fds
        # are not ours to touch (as sd_listen_fds() decides).
        log.info(
            "LISTEN_PID=%s is not this process (%d): ignoring LISTEN_FDS and creating the sockets", listen_pid, own_pid
        )
        return {}
    if not (count_text.isascii() and count_text.isdigit()):
        raise ActivationError(f"LISTEN_FDS={count_text!r} is not a number of file descriptors")
    count = int(count_text)
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + count)
    for fd in fds:
        # Until they are sorted out, none of them may leak into a child.
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
    if count == 0:
        return {}
    if names_text is None:
        raise ActivationError(
            f"LISTEN_FDS={count} but LISTEN_FDNAMES is not set: name the sockets in the .socket units "
            f"(FileDescriptorName={CONTROL_ACTIVATION_NAME} and FileDescriptorName={FD_ACTIVATION_NAME})"
        )
    names = names_text.split(":")
    if len(names) != count:
        raise ActivationError(
            f"LISTEN_FDNAMES={names_text!r} names {len(names)} socket(s) but LISTEN_FDS={count}: "
            "the service manager's variables disagree"
        )
    found: dict[str, _Candidate] = {}
    for fd, name in zip(fds, names, strict=True):
        if name not in EXPECTED_TYPES:
            log.warning("LISTEN_FDNAMES: fd %d is named %r, which dmabufd does not use; leaving it alone", fd, name)
            continue
        if name in found:
            raise ActivationError(f"LISTEN_FDNAMES={names_text!r} names two sockets {name!r}")
        found[name] = _Candidate(fd, f"LISTEN_FDNAMES {name!r} (fd {fd})", "systemd")
    return found


def _adopt(candidate: _Candidate, expected: socket.SocketKind) -> socket.socket:
    """A socket object owning the candidate's fd, once it has passed every
    check; raises ActivationError naming what failed."""
    fd, origin = candidate.fd, candidate.origin
    try:
        mode = os.fstat(fd).st_mode
    except OSError as error:
        raise ActivationError(f"{origin}: fd {fd} cannot be used: {os.strerror(error.errno or 0)}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{origin}: fd {fd} is not a socket (it is {_file_kind(mode)})")
    sock = socket.socket(fileno=fd)
    try:
        problem = _socket_problem(sock, expected, candidate.manager)
        if problem is not None:
            raise ActivationError(f"{origin}: fd {fd} {problem}")
        sock.set_inheritable(False)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _socket_problem(sock: socket.socket, expected: socket.SocketKind, manager: str) -> str | None:
    if sock.family != socket.AF_UNIX:
        return f"is an {getattr(sock.family, 'name', sock.family)} socket, not AF_UNIX"
    if sock.type != expected:
        kind = _TYPE_NAMES.get(sock.type, str(int(sock.type)))
        if manager == "init":
            fix = f"use type {_RC_TYPES[expected]}+listen in its socket line of the .rc"
        else:
            fix = f"declare it with {_UNIT_DIRECTIVES[expected]} in its .socket unit"
        return f"is a {kind} socket, but dmabufd needs {_TYPE_NAMES[expected]} there: {fix}"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        if manager == "init":
            fix = f"give its socket line in the .rc the type {_RC_TYPES[expected]}+listen"
        else:
            fix = "set Accept=no in its .socket unit"
        return f"is not a listening socket (SO_ACCEPTCONN is 0): {fix}"
    return None


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    for test, kind in kinds:
        if test(mode):
            return kind
    return f"of mode {mode:o}"
