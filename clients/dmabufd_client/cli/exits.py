"""Exit codes: the one table the CLI maps errors with, prints in --help
and the README documents."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc

from dmabufd_client.errors import DmabufdError


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1
    INVALID_INPUT = 2
    UNREACHABLE = 3
    NOT_FOUND = 4
    PERMISSION_DENIED = 5
    RESOURCE_EXHAUSTED = 6
    INTERRUPTED = 130


@dataclass(frozen=True)
class ExitRow:
    code: Exit
    meaning: str
    # The gRPC statuses (of the daemon's answer, or of dmabufctl's own
    # check) that end in this code.
    statuses: tuple[grpc.StatusCode, ...] = ()
    # What to do about it, printed under the error.
    hint: str = ""


Status = grpc.StatusCode

EXIT_CODES: tuple[ExitRow, ...] = (
    ExitRow(Exit.OK, "success (watch: also when --timeout or Ctrl-C ends it)"),
    ExitRow(Exit.ERROR, "any other error (the message says what happened)"),
    ExitRow(
        Exit.INVALID_INPUT,
        "invalid input: a bad option or size, not a regular file, a range past the end",
        (Status.INVALID_ARGUMENT, Status.OUT_OF_RANGE),
    ),
    ExitRow(
        Exit.UNREACHABLE,
        "daemon not reachable, or not answering in time",
        (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED),
    ),
    ExitRow(Exit.NOT_FOUND, "not found: a heap, buffer, grant or file", (Status.NOT_FOUND,)),
    ExitRow(
        Exit.PERMISSION_DENIED,
        "permission denied, by the daemon's policy or by the file system",
        (Status.PERMISSION_DENIED,),
        "`dmabufctl heaps` shows which heaps you may use; the daemon's config ([heaps.access], [clients]) decides",
    ),
    ExitRow(
        Exit.RESOURCE_EXHAUSTED,
        "resource exhausted: a quota, a per-uid limit or memory",
        (Status.RESOURCE_EXHAUSTED,),
        "`dmabufctl stats` shows what your uid holds and its quota",
    ),
    ExitRow(Exit.INTERRUPTED, "interrupted by Ctrl-C (except watch, which exits 0)"),
)

# Finer advice where the daemon's reason (its ErrorInfo) tells more than the status.
REASON_HINTS = {
    "HEAP_OUT_OF_MEMORY": "the kernel has no memory for that heap now: try another heap, smaller buffers, or later",
    "OVERLOADED": "too many calls or streams at once for your uid: slow down and retry",
    "FILE_NOT_FOUND": "the daemon opens --by-path files as you: check the path and its directories' permissions",
}

_BY_STATUS = {status: row for row in EXIT_CODES for status in row.statuses}
_BY_CODE = {row.code: row for row in EXIT_CODES}


class CliError(DmabufdError):
    """A problem dmabufctl finds itself, before (or instead of) asking the
    daemon; `status` picks the exit code as for the daemon's errors."""

    def __init__(self, message: str, status: grpc.StatusCode | None, hint: str | None = None) -> None:
        super().__init__(message, status)
        self.hint = hint


def exit_code(error: DmabufdError) -> Exit:
    row = _BY_STATUS.get(error.status) if error.status is not None else None
    return row.code if row is not None else Exit.ERROR


def hint_for(error: DmabufdError) -> str:
    """What to do: the error's own hint, else its exit code's."""
    if isinstance(error, CliError) and error.hint is not None:
        return error.hint
    reason = getattr(error, "reason", None)
    return REASON_HINTS.get(reason or "", _BY_CODE[exit_code(error)].hint)


def exit_code_table() -> str:
    """The table for --help."""
    lines = ["exit codes:"]
    for row in EXIT_CODES:
        statuses = f" [{', '.join(s.name for s in row.statuses)}]" if row.statuses else ""
        lines.append(f"  {row.code.value:>3}  {row.meaning}{statuses}")
    return "\n".join(lines)


def exit_code_summary() -> str:
    """One line for a command's --help."""
    codes = ", ".join(f"{row.code.value} {row.code.name.lower().replace('_', ' ')}" for row in EXIT_CODES)
    return f"exit codes: {codes} (dmabufctl --help says more)"
