"""The parser, global options and the one place errors become exit codes.

Global options (--runtime-dir, --timeout, --json) are accepted before or
after the command: every subparser has them too, with SUPPRESS defaults, so
a subcommand that does not repeat one leaves the value given before it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, NoReturn

import grpc

from dmabufd_client.cli import bench, buffers, completion, dump, heaps, load, output, stats
from dmabufd_client.cli.exits import CliError, Exit, exit_code, exit_code_summary, exit_code_table, hint_for
from dmabufd_client.client import Client, connect
from dmabufd_client.errors import DmabufdError
from dmabufd_common.paths import RUNTIME_DIR_ENV, default_runtime_dir, socket_paths

DEFAULT_TIMEOUT_S = 10.0

ERROR = output.Schema(
    "on failure, stdout has instead",
    (
        output.VERSION_KEY,
        ("error", 'the gRPC status name, e.g. "NOT_FOUND" ("ERROR" when there is none)'),
        ("reason", 'the daemon\'s finer reason, e.g. "QUOTA_EXCEEDED", or null'),
        ("exit_code", "the exit code, as in the table above"),
        ("message", "what went wrong"),
        ("hint", 'what to do about it ("" when nothing to add)'),
    ),
)
Run = Callable[[Any, argparse.Namespace], int]


class UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised to main() (which also reports
    it as JSON under --json) instead of exiting from inside the parser."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def _global_options(top: bool) -> Parser:
    """The options every command takes. On the top-level parser they have
    their defaults; on a command's they are SUPPRESSed unless given."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parent = Parser(add_help=False)
    group = parent.add_argument_group("global options (before or after the command)")
    group.add_argument(
        "--runtime-dir",
        type=Path,
        metavar="DIR",
        default=default(None),
        help=f"the daemon's runtime directory (default: ${RUNTIME_DIR_ENV}, else /run/dmabufd for root "
        "or when a system daemon listens there, else $XDG_RUNTIME_DIR/dmabufd)",
    )
    group.add_argument(
        "--timeout",
        type=output.positive_seconds,
        metavar="SECONDS",
        default=default(None),
        help=f"give up on a call after this long (default {DEFAULT_TIMEOUT_S:g}); "
        "watch: stop watching after this long and exit 0 (default: until Ctrl-C)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts instead of tables (each command's --help lists its keys)",
    )
    return parent


def _version() -> str:
    try:
        return metadata.version("dmabufd")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' tables as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def build_parser() -> Parser:
    parser = Parser(
        prog="dmabufctl",
        description="Inspect and exercise a running dmabufd. Every command prints a table for people,\n"
        "or JSON for scripts with --json (its --help lists the keys).",
        epilog=f"{exit_code_table()}\n\nWith --json, {ERROR.describe()}",
        formatter_class=_Formatter,
        parents=[_global_options(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"dmabufctl {_version()} (dmabufd.v1 API)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [_global_options(top=False)]

    def add(name: str, help_text: str, run: Run, epilog: str = "", *, session: bool = True) -> argparse.ArgumentParser:
        command = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=f"{epilog}\n\n{exit_code_summary()}" if epilog else exit_code_summary(),
            formatter_class=_Formatter,
            parents=parents,
        )
        command.set_defaults(run=run, session=session)
        return command

    heaps.register(add)
    buffers.register(add)
    stats.register(add)
    dump.register(add)
    load.register(add)
    bench.register(add)
    completion.register(add, parser)
    return parser


def open_client(args: argparse.Namespace) -> Client:
    """A session with the daemon; a daemon that is not there is reported
    with what to do about it."""
    runtime_dir: Path = args.runtime_dir or default_runtime_dir()
    hint = (
        f"is dmabufd running? start it with `make run`, or set {RUNTIME_DIR_ENV} (or --runtime-dir) "
        f"to the directory it listens in (tried {runtime_dir})"
    )
    socket_path = socket_paths(runtime_dir).fd
    if not os.path.exists(socket_path):
        raise CliError(f"no dmabufd socket at {socket_path}", grpc.StatusCode.UNAVAILABLE, hint)
    if not os.access(socket_path, os.W_OK):
        raise CliError(
            f"you may not connect to {socket_path} (its mode and group are the daemon's [sockets] config)",
            grpc.StatusCode.PERMISSION_DENIED,
            "ask for the socket's group, or run as a user the daemon's config admits",
        )
    try:
        return connect(runtime_dir, timeout_s=args.call_timeout)
    except DmabufdError as error:
        if exit_code(error) is Exit.UNREACHABLE:
            raise CliError(error.message, error.status, hint) from None
        raise


def report(error: DmabufdError, as_json: bool) -> Exit:
    code = exit_code(error)
    status = error.status.name if error.status is not None else "ERROR"
    reason: str | None = getattr(error, "reason", None)
    hint = hint_for(error)
    if as_json:
        output.emit_json(error_json(status, reason, code, error.message, hint))
    shown = f"{status} ({reason})" if reason else status
    output.stderr.print(f"[red]dmabufctl: {shown}[/red]: {error.message}", markup=True, highlight=False)
    if hint:
        output.stderr.print(f"hint: {hint}", markup=False, highlight=False)
    return code


def error_json(status: str, reason: str | None, code: Exit, message: str, hint: str) -> dict[str, Any]:
    return output.versioned(ERROR, error=status, reason=reason, exit_code=int(code), message=message, hint=hint)


def _usage_error(error: UsageError, as_json: bool) -> Exit:
    error.parser.print_usage(sys.stderr)
    sys.stderr.write(f"{error.parser.prog}: error: {error}\n")
    if as_json:
        hint = f"`{error.parser.prog} --help` lists the options"
        output.emit_json(error_json("INVALID_ARGUMENT", None, Exit.INVALID_INPUT, str(error), hint))
    return Exit.INVALID_INPUT


def _run(args: argparse.Namespace) -> int:
    if validate := getattr(args, "validate", None):
        validate(args)  # local problems first: the daemon is not asked
    run: Run = args.run
    if not args.session:
        return run(None, args)
    with open_client(args) as client:
        return run(client, args)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(arguments)
    except UsageError as error:
        return _usage_error(error, "--json" in arguments)
    # watch's --timeout bounds the stream, not each call.
    args.call_timeout = DEFAULT_TIMEOUT_S if args.command == "watch" or args.timeout is None else args.timeout
    try:
        return _run(args)
    except BrokenPipeError:  # `dmabufctl ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.ERROR
    except DmabufdError as error:
        return report(error, args.json)
    except OSError as error:  # a local file, or the terminal
        return report(CliError(str(error), None), args.json)
    except KeyboardInterrupt:
        output.stderr.print("dmabufctl: interrupted", markup=False)
        return Exit.INTERRUPTED
