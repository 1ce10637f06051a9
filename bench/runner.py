"""Running one mode (or the dmabufd row) once per repeat, per the seed method, and checking
what landed in the buffers."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dmabufd_client
from bench.modes import Mode, ModeUnsupported, Slot, Source
from bench.service_row import (
    CALL_TIMEOUT_S,
    Daemon,
    Outcome,
    describe,
    has_load_file,
    load_file_of,
    running_daemon,
)
from bench.system import CacheDropper, RssSample, RssSampler, cpu_seconds, proc_cpu_seconds
from bench.testfile import BLOCK, SourceFile
from dmabufd_common import uapi

SAMPLE_BYTES = 64
MB = 1_000_000  # MB/s as the seed table counts them (1024 MiB in 312 ms = 3448 MB/s)


class VerifyError(Exception):
    """The buffer does not hold the file's bytes."""


@dataclass
class Run:
    """One pass over the whole file."""

    creat_ms: float | None
    close_ms: float
    io_ms: float
    cpu_ms: float  # user+sys during the I/O (for dmabufd: the daemon's and this process's)
    creat_cpu_ms: float | None
    close_cpu_ms: float
    bytes: int
    buffers: int
    samples_checked: int
    sha256_ok: bool | None  # None: not compared (no --verify)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    number: int
    key: str
    label: str
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    io_pct: float | None = None

    def median(self, name: str) -> float | None:
        values = [getattr(run, name) for run in self.runs]
        present = [value for value in values if value is not None]
        return statistics.median(present) if present else None

    @property
    def mb_s(self) -> float | None:
        io_ms = self.median("io_ms")
        if not self.runs or not io_ms:
            return None
        return self.runs[0].bytes / MB / (io_ms / 1000)

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.number,
            "key": self.key,
            "label": self.label,
            "status": self.status,
            "reason": self.reason,
            "notes": self.notes,
            "creat_ms": self.median("creat_ms"),
            "close_ms": self.median("close_ms"),
            "io_ms": self.median("io_ms"),
            "mb_s": self.mb_s,
            "io_pct": self.io_pct,
            "cpu_ms": self.median("cpu_ms"),
            "creat_cpu_ms": self.median("creat_cpu_ms"),
            "close_cpu_ms": self.median("close_cpu_ms"),
            "verified": bool(self.runs) and all(run.sha256_ok is not False for run in self.runs),
            "runs": [vars(run) for run in self.runs],
        }


@dataclass
class Region:
    """Where one chunk of the file landed, as seen by the CPU."""

    view: memoryview
    sync_fd: int | None
    file_offset: int
    length: int


@contextlib.contextmanager
def cpu_read(region: Region) -> Iterator[memoryview]:
    if region.sync_fd is not None:
        uapi.dma_buf_sync(region.sync_fd, uapi.SyncFlags.START | uapi.SyncFlags.READ)
    try:
        yield region.view
    finally:
        if region.sync_fd is not None:
            uapi.dma_buf_sync(region.sync_fd, uapi.SyncFlags.END | uapi.SyncFlags.READ)


def sample_offsets(length: int, salt: int) -> list[int]:
    """First, middle, last and one pseudo-random block of a chunk."""
    blocks = length // BLOCK
    picks = {0, blocks // 2, blocks - 1, (salt * 2654435761) % blocks}
    return sorted(block * BLOCK for block in picks)


def check_samples(source: SourceFile, fd: int, region: Region) -> int:
    """Compare SAMPLE_BYTES at a few block starts with the file; returns how many."""
    offsets = sample_offsets(region.length, region.file_offset // BLOCK)
    with cpu_read(region) as view:
        for offset in offsets:
            want = source.expected(region.file_offset + offset, SAMPLE_BYTES, fd)
            got = bytes(view[offset : offset + SAMPLE_BYTES])
            if got != want:
                raise VerifyError(
                    f"file offset {region.file_offset + offset}: buffer holds {got[:8].hex()}..., "
                    f"file {want[:8].hex()}..."
                )
    return len(offsets)


def check_sha256(source: SourceFile, regions: Sequence[Region]) -> bool:
    digest = hashlib.sha256()
    for region in regions:
        with cpu_read(region) as view:
            digest.update(view[: region.length])
    return digest.hexdigest() == source.sha256


def chunks(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(offset, min(chunk, size - offset)) for offset in range(0, size, chunk)]


@dataclass
class Setup:
    """What every row shares: the file, its two fds, the chunk size, how caches are dropped."""

    source: SourceFile
    fds: Source
    chunk: int
    dropper: CacheDropper
    verify: bool
    repeat: int


@dataclass
class ServiceRequest:
    """How row 9 asks dmabufd to load."""

    method: str = "auto"
    heap: str = ""
    usage: str = "model-weights"


def run_mode(mode: Mode, setup: Setup) -> Run:
    """One pass of a raw mode over the file. Raises ModeUnsupported, VerifyError, OSError."""
    source, fds, chunk, dropper, verify = setup.source, setup.fds, setup.chunk, setup.dropper, setup.verify
    slots: list[Slot] = []
    regions: list[Region] = []
    creat_s = io_s = io_cpu = creat_cpu = 0.0
    samples = 0
    mode.begin()
    try:
        dropper.drop(fds.buffered_fd)
        for offset, length in chunks(source.size, chunk):
            os.posix_fadvise(fds.buffered_fd, offset, length, os.POSIX_FADV_DONTNEED)
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            slot = mode.create(length)
            t1, cpu1 = time.perf_counter(), cpu_seconds()
            slots.append(slot)
            mode.load(fds, slot, offset, length)
            t2, cpu2 = time.perf_counter(), cpu_seconds()
            creat_s += t1 - t0
            creat_cpu += cpu1 - cpu0
            io_s += t2 - t1
            io_cpu += cpu2 - cpu1
            region = Region(slot.view, slot.sync_fd, offset, length)
            regions.append(region)
            samples += check_samples(source, fds.buffered_fd, region)
        sha256_ok = check_sha256(source, regions) if verify else None
        if sha256_ok is False:
            raise VerifyError("sha256 of the buffers differs from the file's")
        regions.clear()
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        while slots:
            slots.pop().close()
        close_s, close_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    finally:
        regions.clear()
        for slot in slots:
            slot.close()
        mode.end()
        dropper.drop(fds.buffered_fd)
    return Run(
        creat_ms=creat_s * 1000,
        close_ms=close_s * 1000,
        io_ms=io_s * 1000,
        cpu_ms=io_cpu * 1000,
        creat_cpu_ms=creat_cpu * 1000,
        close_cpu_ms=close_cpu * 1000,
        bytes=source.size,
        buffers=len(chunks(source.size, chunk)),
        samples_checked=samples,
        sha256_ok=sha256_ok,
    )


def run_raw_row(mode: Mode, setup: Setup) -> Row:
    row = Row(mode.number, mode.key, mode.label, notes=mode.notes)
    reason = mode.skip_reason()
    if reason is not None:
        row.status, row.reason = "skipped", reason
        return row
    try:
        for _ in range(setup.repeat):
            row.runs.append(run_mode(mode, setup))
    except ModeUnsupported as unsupported:
        row.status, row.reason, row.runs = "skipped", str(unsupported), []
    except (VerifyError, OSError) as error:
        row.status, row.reason = "failed", f"{type(error).__name__}: {error}"
    return row


# -- the dmabufd row ----------------------------------------------------------

DMABUFD_ROW = (9, "dmabufd-load", "dmabufd load")


def map_placements(outcome: Outcome, stack: contextlib.ExitStack, size: int) -> list[Region]:
    """Map each buffer once (read-only) and give a Region per placement, in file order; the
    placements must cover the file exactly."""
    views: dict[int, memoryview] = {}
    regions: list[Region] = []
    covered = 0
    for placement in outcome.placements:
        if placement.file_offset != covered:
            raise VerifyError(f"the buffers hold file bytes from {placement.file_offset}, expected {covered}")
        buffer = placement.buffer
        fd = buffer.fileno()
        if fd not in views:
            region = stack.enter_context(mmap.mmap(fd, buffer.size, mmap.MAP_SHARED, mmap.PROT_READ))
            views[fd] = memoryview(region)
            stack.callback(views[fd].release)
        view = views[fd][placement.buffer_offset : placement.buffer_offset + placement.length]
        stack.callback(view.release)
        regions.append(Region(view, fd if buffer.is_dma_buf else None, placement.file_offset, placement.length))
        covered += placement.length
    if covered != size:
        raise VerifyError(f"the buffers hold {covered} bytes, the file {size}")
    return regions


def run_dmabufd_once(client: dmabufd_client.Client, daemon: Daemon, setup: Setup, request: ServiceRequest) -> Run:
    source, fds, chunk, dropper, verify = setup.source, setup.fds, setup.chunk, setup.dropper, setup.verify
    load_file = load_file_of(client)
    assert load_file is not None
    dropper.drop(fds.buffered_fd)
    os.posix_fadvise(fds.buffered_fd, 0, 0, os.POSIX_FADV_DONTNEED)
    # The daemon gets its own descriptor of the file (no O_DIRECT: it chooses).
    file_fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    rss = RssSample()
    daemon_cpu0 = proc_cpu_seconds(daemon.pid) if daemon.pid is not None else None
    try:
        sampler = RssSampler(daemon.pid) if daemon.pid is not None else contextlib.nullcontext()
        with sampler:
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            loaded = load_file(
                file_fd,
                offset=0,
                length=source.size,
                heap=request.heap,
                usage=request.usage,
                name="bench",
                method=request.method,
                verify=False,
                max_buffer_bytes=chunk,
            )
            t1, cpu1 = time.perf_counter(), cpu_seconds()
        if isinstance(sampler, RssSampler):
            rss = sampler.result
        daemon_cpu = None
        if daemon.pid is not None and daemon_cpu0 is not None:
            daemon_cpu = proc_cpu_seconds(daemon.pid) - daemon_cpu0
    finally:
        os.close(file_fd)
    try:
        outcome = describe(loaded, source.size)
        with contextlib.ExitStack() as stack:
            regions = map_placements(outcome, stack, source.size)
            samples = sum(check_samples(source, fds.buffered_fd, region) for region in regions)
            sha256_ok = check_sha256(source, regions) if verify else None
            if sha256_ok is False:
                raise VerifyError("sha256 of the buffers differs from the file's")
        cpu2, t2 = cpu_seconds(), time.perf_counter()
        loaded.close()
        close_s, close_cpu = time.perf_counter() - t2, cpu_seconds() - cpu2
    except BaseException:
        loaded.close()
        raise
    finally:
        dropper.drop(fds.buffered_fd)
    client_cpu = cpu1 - cpu0
    return Run(
        creat_ms=None,
        close_ms=close_s * 1000,
        io_ms=(t1 - t0) * 1000,
        cpu_ms=((daemon_cpu if daemon_cpu is not None else outcome.cpu_seconds) + client_cpu) * 1000,
        creat_cpu_ms=None,
        close_cpu_ms=close_cpu * 1000,
        bytes=source.size,
        buffers=len(outcome.buffers),
        samples_checked=samples,
        sha256_ok=sha256_ok,
        extra={
            "method": outcome.method,
            "stats": outcome.stats,
            "reported_bytes": outcome.bytes,
            "daemon_wall_ms": outcome.wall_seconds * 1000,
            "daemon_cpu_ms_reported": outcome.cpu_seconds * 1000,
            "daemon_cpu_ms_measured": None if daemon_cpu is None else daemon_cpu * 1000,
            "client_cpu_ms": client_cpu * 1000,
            "rss": {
                "pid": daemon.pid,
                "before": rss.before,
                "peak": rss.peak,
                "growth": {key: rss.growth(key) for key in rss.before},
                "samples": rss.samples,
                "vmhwm_after_reset": rss.hwm_after,
            },
        },
    )


def run_dmabufd_row(runtime_dir: Path | None, setup: Setup, request: ServiceRequest) -> Row:
    number, key, label = DMABUFD_ROW
    row = Row(number, key, label)
    if not has_load_file():
        row.status, row.reason = "skipped", "dmabufd has no load_file yet"
        return row
    try:
        with (
            running_daemon(runtime_dir) as daemon,
            dmabufd_client.connect(daemon.runtime_dir, CALL_TIMEOUT_S) as client,
        ):
            row.notes.append(
                f"{'private daemon started here' if daemon.private else 'daemon at ' + str(daemon.runtime_dir)}"
                + ("" if daemon.pid is not None else "; its pid is unknown: no RSS or measured daemon CPU")
            )
            for _ in range(setup.repeat):
                row.runs.append(run_dmabufd_once(client, daemon, setup, request))
    except Exception as error:  # the API is young: report any failure in the row, keep the others
        row.status, row.reason = "failed", f"{type(error).__name__}: {error}"
    if row.runs:
        row.label = f"dmabufd load ({row.runs[-1].extra['method']})"
    return row
