"""`load`: a file into buffers, with a progress bar.

The file is checked and opened here before the daemon is asked: a missing
file, a directory or a FIFO (which would block open() until a writer
came) is refused at once with its own exit code.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import stat
import time
from dataclasses import asdict
from pathlib import Path

import grpc
from rich.table import Table

from dmabufd_client.cli import output
from dmabufd_client.cli.exits import CliError
from dmabufd_client.cli.output import BUFFER, VERSION_KEY, Schema
from dmabufd_client.cli.registry import AddCommand
from dmabufd_client.client import LOAD_METHODS, Client
from dmabufd_common.units import format_rate, format_size

SEGMENT = Schema(
    "a segment (where a piece of the file landed)",
    (
        ("buffer_id", "the buffer"),
        ("buffer_offset", "where in the buffer it starts"),
        ("file_offset", "where in the file it comes from"),
        ("length", "bytes"),
    ),
)

LOAD = Schema(
    "the object",
    (
        VERSION_KEY,
        ("path", "the file"),
        ("method", "the load method used"),
        ("bytes", "bytes loaded"),
        ("seconds", "end to end, as dmabufctl saw it"),
        ("daemon_wall_seconds", "the load in the daemon"),
        ("daemon_cpu_seconds", "the daemon's CPU time for it"),
        ("mb_per_s", "bytes / daemon_wall_seconds / 10^6"),
        ("verified", "the buffers were compared with the file (--verify)"),
        ("parallelism", "I/O requests the daemon kept in flight"),
        ("prepared_bytes", "bytes of the buffers that were prepared memfds (heaps.memfd_reserve)"),
        ("buffers", "the buffers, as below"),
        ("segments", "the file's pieces, as below"),
    ),
    (BUFFER, SEGMENT),
)

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
}


def _refuse_kind(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise CliError(
            f"{path} is {kind}: dmabufctl loads regular files only",
            grpc.StatusCode.INVALID_ARGUMENT,
            "copy the data into a regular file first" if stat.S_ISFIFO(mode) else "",
        )


def check_file(path: Path, offset: int, length: int) -> os.stat_result:
    """What the daemon would refuse, refused here and now."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CliError(f"{path}: no such file", grpc.StatusCode.NOT_FOUND, "") from None
    except PermissionError:
        raise CliError(f"{path}: permission denied", grpc.StatusCode.PERMISSION_DENIED, "") from None
    except OSError as error:
        raise CliError(f"{path}: {error.strerror}", grpc.StatusCode.INVALID_ARGUMENT, "") from None
    _refuse_kind(path, info.st_mode)
    if offset > info.st_size or offset + length > info.st_size:
        raise CliError(
            f"{path} has {info.st_size} bytes: --offset {offset} --length {length} is past its end",
            grpc.StatusCode.OUT_OF_RANGE,
            "",
        )
    return info


def open_file(path: Path) -> int:
    """An fd for the file, opened so that something swapped in after the
    check (a FIFO) cannot block: O_NONBLOCK, then fstat, then blocking again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except PermissionError:
        raise CliError(f"{path}: permission denied", grpc.StatusCode.PERMISSION_DENIED, "") from None
    except OSError as error:
        raise CliError(f"cannot open {path}: {error.strerror}", grpc.StatusCode.INVALID_ARGUMENT, "") from None
    try:
        _refuse_kind(path, os.fstat(fd).st_mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    fd = None if args.by_path else open_file(args.path)
    started = time.perf_counter()
    try:
        with output.progress_bar(f"loading {args.path}", transfer=True) as update:

            def progress(done: int, total: int) -> None:
                if args.verify and total and done >= total:
                    update(
                        description=f"verifying {args.path} (SHA-256 of file and buffers)", completed=done, total=None
                    )
                else:
                    update(completed=done, total=total or None)

            loaded = client.load_file(
                args.path if fd is None else fd,
                offset=args.offset,
                length=args.length,
                heap=args.heap,
                usage=args.usage,
                name=args.name,
                method=args.method,
                verify=args.verify,
                max_buffer_bytes=args.max_buffer,
                by_path=args.by_path,
                progress=progress,
                npu_buffer_type=args.npu_buffer_type,
                npu_device=args.npu_device,
            )
    finally:
        if fd is not None:
            os.close(fd)
    seconds = time.perf_counter() - started
    with loaded:
        stats = loaded.stats
        rate = stats.bytes / stats.wall_seconds if stats.wall_seconds else 0.0
        if args.json:
            output.emit_json(
                output.versioned(
                    LOAD,
                    path=str(args.path),
                    method=stats.method,
                    bytes=stats.bytes,
                    seconds=seconds,
                    daemon_wall_seconds=stats.wall_seconds,
                    daemon_cpu_seconds=stats.cpu_seconds,
                    mb_per_s=rate / 1e6,
                    verified=stats.verified,
                    parallelism=stats.parallelism,
                    prepared_bytes=stats.prepared_bytes,
                    buffers=[output.buffer_json(b.info) for b in loaded.buffers],
                    segments=[SEGMENT.object(**asdict(segment)) for segment in loaded.segments],
                )
            )
        else:
            table = Table(title=f"{args.path}: {format_size(stats.bytes)} by {stats.method}")
            for column in ("buffer", "heap", "size", "file offset", "length", "buffer offset"):
                table.add_column(column)
            for segment in loaded.segments:
                info = loaded.buffer_of(segment).info
                table.add_row(
                    str(info.id),
                    info.heap,
                    format_size(info.size),
                    str(segment.file_offset),
                    format_size(segment.length),
                    str(segment.buffer_offset),
                )
            output.stdout.print(table)
            verified = "verified against the file" if stats.verified else "not verified (--verify)"
            prepared = f", {format_size(stats.prepared_bytes)} into prepared memory" if stats.prepared_bytes else ""
            output.stdout.print(
                f"{format_rate(rate)} in the daemon ({stats.wall_seconds:.3f} s wall, {stats.cpu_seconds:.3f} s CPU, "
                f"{stats.parallelism} in flight{prepared}); {seconds:.3f} s end to end; {verified}",
                highlight=False,
            )
        if args.hold:
            time.sleep(args.hold)
    return 0


def validate(args: argparse.Namespace) -> None:
    check_file(args.path, args.offset, args.length)


def register(add: AddCommand) -> None:
    load = add(
        "load",
        "load a file into buffers, with a progress bar (they go when the command exits)",
        cmd_load,
        output.document(LOAD),
    )
    load.add_argument("path", type=Path, help="a regular file (checked here before the daemon is asked)")
    load.add_argument("--offset", type=output.size, default=0, help="where in the file to start (default 0)")
    load.add_argument("--length", type=output.size, default=0, help="bytes to load (default: to the end)")
    load.add_argument("--heap", default="", help="heap name or alias (default: chosen by --usage)")
    load.add_argument(
        "--usage",
        default=None,
        help="usage hint that picks the heap (default model-weights, or the usage of --npu-buffer-type)",
    )
    load.add_argument("--name", default="dmabufctl-load", help="label shown in fdinfo (default dmabufctl-load)")
    load.add_argument(
        "--method",
        default="auto",
        choices=list(LOAD_METHODS.values()),
        help="how the daemon moves the data (default auto: the fastest the kernel proved)",
    )
    output.add_npu_options(load)
    load.add_argument("--verify", action="store_true", help="compare the loaded bytes with the file (SHA-256)")
    load.add_argument("--max-buffer", type=output.size, default=0, help="split into buffers of at most this size")
    load.add_argument(
        "--by-path", action="store_true", help="send the path, not an fd (the daemon's [loading] roots decide)"
    )
    load.add_argument(
        "--hold", type=output.seconds, default=0.0, metavar="SECONDS", help="keep the buffers this long (default 0)"
    )
    load.set_defaults(validate=validate)
