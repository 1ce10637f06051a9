"""`stats`: who holds what, per client and per heap (GetStats)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from dmabufd_client.cli import output
from dmabufd_client.cli.output import VERSION_KEY, Schema
from dmabufd_client.cli.registry import AddCommand
from dmabufd_client.client import Client
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.units import format_size

CLIENT = Schema(
    "a client (one session)",
    (
        ("session_id", "the session"),
        ("pid", "its process"),
        ("uid", "its uid"),
        ("gid", "its gid"),
        ("command", "/proc/<pid>/comm, when readable"),
        ("connected_at", "seconds since the epoch"),
        ("buffer_count", "buffers booked to this session"),
        ("bytes", "their bytes"),
        ("charged_buffers", "what the uid is charged against its quota, over all its sessions"),
        ("charged_bytes", "the same, in bytes"),
        ("quota_buffers", "the uid's quota"),
        ("quota_bytes", "the uid's quota, in bytes"),
        ("proc_checked", "whether /proc/<pid> was read (--proc, and readable)"),
        ("proc_buffer_count", "booked buffers found open in /proc/<pid>/fd (0 unless proc_checked)"),
        ("proc_bytes", "their bytes"),
        ("proc_dmabuf_count", "every dma-buf in its /proc/<pid>/fdinfo, booked or not (memfds are not dma-bufs)"),
        ("proc_dmabuf_bytes", "their bytes"),
    ),
)

HEAP_USAGE = Schema(
    "a heap's usage",
    (("heap", "the heap"), ("buffer_count", "buffers booked from it"), ("bytes", "their bytes")),
)

STATS = Schema(
    "the object",
    (
        VERSION_KEY,
        ("all_clients", "true when you see every client (an admin); else only your uid's"),
        ("clients", "the clients, as below"),
        ("heaps", "usage per heap, as below"),
        ("total_buffers", "booked buffers of the clients shown"),
        ("total_bytes", "their bytes"),
        ("lingering_buffers", "released buffers still charged because a process holds them"),
        ("models", "resident shared models"),
        ("model_bytes", "their bytes"),
        ("allocations", "buffers allocated since the daemon started"),
        ("releases", "buffers released since then"),
        ("denials", "allocations refused (quota, access) since then"),
        ("sessions_opened", "sessions opened since then"),
        ("sessions_closed", "sessions closed since then"),
    ),
    (CLIENT, HEAP_USAGE),
)


def client_json(c: pb.ClientStats) -> dict[str, Any]:
    return CLIENT.object(
        session_id=c.session_id,
        pid=c.pid,
        uid=c.uid,
        gid=c.gid,
        command=c.command,
        connected_at=c.connected_at,
        buffer_count=c.buffer_count,
        bytes=c.bytes,
        charged_buffers=c.charged_buffers,
        charged_bytes=c.charged_bytes,
        quota_buffers=c.quota_buffers,
        quota_bytes=c.quota_bytes,
        proc_checked=c.proc_checked,
        proc_buffer_count=c.proc_buffer_count,
        proc_bytes=c.proc_bytes,
        proc_dmabuf_count=c.proc_dmabuf_count,
        proc_dmabuf_bytes=c.proc_dmabuf_bytes,
    )


def stats_json(stats: pb.Stats) -> dict[str, Any]:
    """Every field a number, bool or string of its own type (protobuf's
    MessageToDict would write the 64-bit ones as strings)."""
    return output.versioned(
        STATS,
        all_clients=stats.all_clients,
        clients=[client_json(c) for c in stats.clients],
        heaps=[HEAP_USAGE.object(heap=h.heap, buffer_count=h.buffer_count, bytes=h.bytes) for h in stats.heaps],
        total_buffers=stats.total_buffers,
        total_bytes=stats.total_bytes,
        lingering_buffers=stats.lingering_buffers,
        models=stats.models,
        model_bytes=stats.model_bytes,
        allocations=stats.allocations,
        releases=stats.releases,
        denials=stats.denials,
        sessions_opened=stats.sessions_opened,
        sessions_closed=stats.sessions_closed,
    )


def counted(count: int, size: int) -> str:
    return f"{count} ({format_size(size)})"


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    stats = client.stats(check_proc=args.proc)
    if args.json:
        output.emit_json(stats_json(stats))
        return 0
    clients = Table(title="clients" if stats.all_clients else "clients (your uid's only: not an admin)")
    columns = ["session", "pid", "uid", "command", "buffers", "bytes", "uid charged", "uid quota"]
    if args.proc:
        columns += ["open (/proc)", "dma-bufs (fdinfo)"]
    for column in columns:
        clients.add_column(column)
    for c in stats.clients:
        command = c.command or "?"
        row = [
            str(c.session_id),
            str(c.pid),
            str(c.uid),
            f"{command} (this run)" if c.session_id == client.session_id else command,
            str(c.buffer_count),
            format_size(c.bytes),
            format_size(c.charged_bytes),
            f"{format_size(c.quota_bytes)}, {c.quota_buffers} buffers",
        ]
        if args.proc:
            row.append(str(c.proc_buffer_count) if c.proc_checked else "unreadable")
            row.append(counted(c.proc_dmabuf_count, c.proc_dmabuf_bytes) if c.proc_checked else "-")
        clients.add_row(*row)
    output.stdout.print(clients)
    heaps = Table(title="heaps")
    for column in ("heap", "buffers", "bytes"):
        heaps.add_column(column)
    for h in stats.heaps:
        heaps.add_row(h.heap, str(h.buffer_count), format_size(h.bytes))
    heaps.add_row("total", str(stats.total_buffers), format_size(stats.total_bytes), style="bold")
    output.stdout.print(heaps)
    output.stdout.print(
        f"resident models: {counted(stats.models, stats.model_bytes)}; lingering (released, still held): "
        f"{stats.lingering_buffers}\nsince start: {stats.allocations} allocated, {stats.releases} released, "
        f"{stats.denials} denied, {stats.sessions_opened} sessions opened, {stats.sessions_closed} closed",
        highlight=False,
    )
    return 0


def register(add: AddCommand) -> None:
    stats = add("stats", "who holds what, per client and per heap (GetStats)", cmd_stats, output.document(STATS))
    stats.add_argument(
        "--proc", action="store_true", help="cross-check each client against its /proc/<pid>/fd and fdinfo"
    )
