"""`dump`: every client's buffers in dmabuf_dump's layout.

Per process: its buffers (Name, Size, Ino, Exporter), read from
/proc/<pid>/fd as dmabuf_dump reads them, then a PROCESS TOTAL line with
what the daemon booked to it and charges its uid (GetStats with
check_proc); then a grand total, each buffer counted once. Which clients
are listed is the daemon's decision: an admin sees all, anyone else their
own uid's. dmabufctl's own session is left out.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from typing import Any

import grpc

from dmabufd_client.cli import output
from dmabufd_client.cli.exits import CliError
from dmabufd_client.cli.output import VERSION_KEY, Schema
from dmabufd_client.cli.procfs import HeldBuffer, held_buffers
from dmabufd_client.cli.registry import AddCommand
from dmabufd_client.client import Client
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from dmabufd_common.units import format_size

DUMP_BUFFER = Schema(
    "a buffer",
    (
        ("name", "the dma-buf's name, or the memfd's (dmabufd names them <pid>:<label>)"),
        ("size", "bytes"),
        ("inode", "inode of the buffer's file"),
        ("exporter", 'the dma-buf exporter (its heap), or "memfd"'),
    ),
)

DUMP_PROCESS = Schema(
    "a process",
    (
        ("pid", "the client process"),
        ("command", "its /proc/<pid>/comm"),
        ("uid", "its uid"),
        ("session_ids", "its dmabufd sessions"),
        ("readable", "whether dmabufctl could read its /proc/<pid>/fd (else buffers is empty)"),
        ("buffers", "what it holds, as below, by inode"),
        ("total_buffers", "buffers it holds"),
        ("total_bytes", "their bytes"),
        ("booked_buffers", "buffers dmabufd booked to its sessions"),
        ("booked_bytes", "their bytes"),
        ("booked_open_buffers", "of those, how many the daemon found open in /proc (null: it could not read)"),
        ("charged_buffers", "what its uid is charged, over all its processes"),
        ("charged_bytes", "the same, in bytes"),
    ),
)

DUMP = Schema(
    "the object",
    (
        VERSION_KEY,
        ("all_clients", "true when the daemon showed every client (you are an admin)"),
        ("processes", "the processes, as below, by pid"),
        ("total_buffers", "buffers over all processes, each counted once"),
        ("total_bytes", "their bytes"),
        ("booked_buffers", "buffers dmabufd booked to the sessions shown"),
        ("booked_bytes", "their bytes"),
    ),
    (DUMP_PROCESS, DUMP_BUFFER),
)

CSV_COLUMNS = ("row", "pid", "command", "uid", "name", "size", "inode", "exporter", "buffers")
CSV_DOC = (
    "CSV (--csv): a header, then one line per buffer (row=buffer), per process "
    "(row=process_total, name PROCESS TOTAL) and one at the end (row=total, name TOTAL); "
    f"columns: {', '.join(CSV_COLUMNS)}; size in bytes."
)


@dataclass
class Process:
    pid: int
    command: str
    uid: int
    session_ids: list[int] = field(default_factory=list)
    booked_buffers: int = 0
    booked_bytes: int = 0
    booked_open: int | None = 0
    charged_buffers: int = 0
    charged_bytes: int = 0
    buffers: list[HeldBuffer] | None = None

    @property
    def held(self) -> list[HeldBuffer]:
        return self.buffers or []

    @property
    def total_bytes(self) -> int:
        return sum(b.size for b in self.held)


def processes(stats: pb.Stats, own_session: int) -> list[Process]:
    by_pid: dict[int, Process] = {}
    for c in stats.clients:
        if c.session_id == own_session:
            continue
        process = by_pid.setdefault(c.pid, Process(c.pid, c.command, c.uid))
        process.session_ids.append(c.session_id)
        process.booked_buffers += c.buffer_count
        process.booked_bytes += c.bytes
        if process.booked_open is not None:
            process.booked_open = process.booked_open + c.proc_buffer_count if c.proc_checked else None
        process.charged_buffers, process.charged_bytes = c.charged_buffers, c.charged_bytes
    for process in by_pid.values():
        process.buffers = held_buffers(process.pid)
    return [by_pid[pid] for pid in sorted(by_pid)]


def distinct(procs: list[Process]) -> dict[int, HeldBuffer]:
    return {b.inode: b for p in procs for b in p.held}


def dump_json(stats: pb.Stats, procs: list[Process]) -> dict[str, Any]:
    every = distinct(procs)
    return output.versioned(
        DUMP,
        all_clients=stats.all_clients,
        processes=[
            DUMP_PROCESS.object(
                pid=p.pid,
                command=p.command,
                uid=p.uid,
                session_ids=p.session_ids,
                readable=p.buffers is not None,
                buffers=[
                    DUMP_BUFFER.object(name=b.name, size=b.size, inode=b.inode, exporter=b.exporter) for b in p.held
                ],
                total_buffers=len(p.held),
                total_bytes=p.total_bytes,
                booked_buffers=p.booked_buffers,
                booked_bytes=p.booked_bytes,
                booked_open_buffers=p.booked_open,
                charged_buffers=p.charged_buffers,
                charged_bytes=p.charged_bytes,
            )
            for p in procs
        ],
        total_buffers=len(every),
        total_bytes=sum(b.size for b in every.values()),
        booked_buffers=stats.total_buffers,
        booked_bytes=stats.total_bytes,
    )


def write_csv(procs: list[Process]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in procs:
        for b in p.held:
            writer.writerow(("buffer", p.pid, p.command, p.uid, b.name, b.size, b.inode, b.exporter, 1))
        writer.writerow(("process_total", p.pid, p.command, p.uid, "PROCESS TOTAL", p.total_bytes, "", "", len(p.held)))
    every = distinct(procs)
    writer.writerow(("total", "", "", "", "TOTAL", sum(b.size for b in every.values()), "", "", len(every)))


def write_text(stats: pb.Stats, procs: list[Process]) -> None:
    out: list[str] = []
    seen = "every client (you are an admin)" if stats.all_clients else "your uid's clients only (not an admin)"
    out.append(f"dmabufd clients: {seen}; buffers as /proc/<pid>/fd shows them")
    names = [b.name for p in procs for b in p.held]
    width = max([len("PROCESS TOTAL"), *map(len, names)]) + 2
    for p in procs:
        sessions = ", ".join(map(str, p.session_ids))
        out.append(f"{p.command or '?'}:{p.pid} (uid {p.uid}, session {sessions})")
        out.append(f"{'Name':>{width}}  {'Size':>10}  {'Ino':>10}  Exporter")
        if p.buffers is None:
            out.append(f"{'':>{width}}  (cannot read /proc/{p.pid}/fd: run dmabufctl as root or as uid {p.uid})")
        for b in p.held:
            out.append(f"{b.name:>{width}}  {format_size(b.size):>10}  {b.inode:>10}  {b.exporter}")
        open_note = "" if p.booked_open is None else f", {p.booked_open} open"
        out.append(
            f"{'PROCESS TOTAL':>{width}}  {format_size(p.total_bytes):>10}  in {len(p.held)} buffer(s); "
            f"booked by dmabufd: {p.booked_buffers} ({format_size(p.booked_bytes)}){open_note}; "
            f"uid {p.uid} charged: {p.charged_buffers} ({format_size(p.charged_bytes)})"
        )
    every = distinct(procs)
    out.append("-" * (width + 36))
    out.append(
        f"dmabuf total: {len(every)} buffer(s), {format_size(sum(b.size for b in every.values()))} "
        f"in {len(procs)} process(es); booked by dmabufd: {stats.total_buffers} ({format_size(stats.total_bytes)})"
    )
    sys.stdout.write("\n".join(out) + "\n")


def cmd_dump(client: Client, args: argparse.Namespace) -> int:
    if args.csv and args.json:
        raise CliError("--csv and --json exclude each other: choose one", grpc.StatusCode.INVALID_ARGUMENT, "")
    stats = client.stats(check_proc=True)
    procs = processes(stats, client.session_id)
    if args.json:
        output.emit_json(dump_json(stats, procs))
    elif args.csv:
        write_csv(procs)
    else:
        write_text(stats, procs)
    return 0


def register(add: AddCommand) -> None:
    dump = add(
        "dump",
        "every client's buffers, per process, in dmabuf_dump's layout (admins see all clients)",
        cmd_dump,
        f"{output.document(DUMP)}\n\n{CSV_DOC}",
    )
    dump.add_argument("--csv", action="store_true", help="print CSV instead of the table (see below)")
