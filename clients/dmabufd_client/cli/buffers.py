"""`alloc` and `buffers`: this session's buffers."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.table import Table

from dmabufd_client.buffer import BufferInfo
from dmabufd_client.cli import output
from dmabufd_client.cli.output import BUFFER, VERSION_KEY, Schema
from dmabufd_client.cli.registry import AddCommand
from dmabufd_client.client import Client
from dmabufd_common.units import format_size

ALLOC = Schema(
    "the object",
    (
        VERSION_KEY,
        ("session_id", "the session that held them (ended when dmabufctl exited)"),
        ("seconds", "how long the Allocate call took, fds received"),
        ("hold_seconds", "how long they are held once this is printed (--hold)"),
        ("buffers", "the buffers, as below"),
    ),
    (BUFFER,),
)

BUFFERS = Schema(
    "the object",
    (
        VERSION_KEY,
        ("session_id", "this dmabufctl run's own session"),
        ("buffers", "the buffers booked to that session, as below (a new session has none)"),
    ),
    (BUFFER,),
)


def buffer_table(title: str, infos: Sequence[BufferInfo], fds: Sequence[int] | None = None) -> Table:
    table = Table(title=title)
    for column in ("id", "heap", "backend", "size", "kernel name", "inode", *(("fd",) if fds is not None else ())):
        table.add_column(column)
    for index, info in enumerate(infos):
        row = [str(info.id), info.heap, info.backend.name.lower(), format_size(info.size), info.kernel_name]
        row.append(str(info.inode))
        if fds is not None:
            row.append(str(fds[index]))
        table.add_row(*row)
    return table


def cmd_alloc(client: Client, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    held = client.allocate_batch(
        args.size,
        args.count,
        heap=args.heap,
        usage=args.usage,
        name=args.name,
        npu_buffer_type=args.npu_buffer_type,
        npu_device=args.npu_device,
    )
    elapsed = time.perf_counter() - started
    try:
        infos = [buffer.info for buffer in held]
        if args.json:
            output.emit_json(
                output.versioned(
                    ALLOC,
                    session_id=client.session_id,
                    seconds=elapsed,
                    hold_seconds=args.hold,
                    buffers=[output.buffer_json(info) for info in infos],
                )
            )
            sys.stdout.flush()  # a script can read the ids while they are held
        else:
            title = f"{len(held)} buffer(s), {format_size(sum(i.size for i in infos))}, in {elapsed * 1000:.2f} ms"
            output.stdout.print(buffer_table(title, infos, [buffer.fileno() for buffer in held]))
            if args.hold:
                output.stdout.print(f"holding them {args.hold:g} s (session {client.session_id}; Ctrl-C ends it) ...")
        if args.hold:
            time.sleep(args.hold)
    finally:
        for buffer in held:
            buffer.close()
    return 0


def cmd_buffers(client: Client, args: argparse.Namespace) -> int:
    infos = client.buffers()
    if args.json:
        output.emit_json(
            output.versioned(BUFFERS, session_id=client.session_id, buffers=[output.buffer_json(i) for i in infos])
        )
        return 0
    if infos:
        output.stdout.print(buffer_table(f"session {client.session_id}: {len(infos)} buffer(s)", infos))
    else:
        output.stdout.print(
            f"session {client.session_id} (this dmabufctl run) holds no buffers: every dmabufctl run is a "
            "session of its own, and its buffers go when it exits. `dmabufctl dump` shows every client's."
        )
    return 0


def register(add: AddCommand) -> None:
    alloc = add(
        "alloc",
        "allocate buffers, hold them, then release them (all go when the command exits)",
        cmd_alloc,
        output.document(ALLOC),
    )
    alloc.add_argument("--size", type=output.size, required=True, help=f"bytes per buffer ({output.SIZE_HELP})")
    alloc.add_argument("--count", type=output.positive_int, default=1, metavar="N", help="buffers (default 1)")
    alloc.add_argument("--heap", default="", help="heap name or alias (default: chosen by --usage)")
    alloc.add_argument("--usage", default="", help="usage hint that picks the heap, e.g. camera (see `heaps`)")
    alloc.add_argument("--name", default="dmabufctl", help="label shown in fdinfo, <= 23 bytes (default dmabufctl)")
    output.add_npu_options(alloc)
    alloc.add_argument(
        "--hold", type=output.seconds, default=0.0, metavar="SECONDS", help="keep the buffers this long (default 0)"
    )

    add(
        "buffers",
        "list the buffers of this dmabufctl run's own session (ListBuffers; see dump for every client's)",
        cmd_buffers,
        output.document(BUFFERS),
    )
