"""Load a file into buffers the eight ways of the dma-buf direct I/O series, and through dmabufd.

    python -m bench.load_modes [--file PATH | --size 1G] [--chunk 32M] [--dir DIR] [--modes 1,2,...]
                               [--repeat N] [--verify] [--json] [--no-drop-caches] [--runtime-dir DIR]

Per mode (seed method, ../shared/reference/seed-benchmark.md): the file is split into chunks; per
chunk posix_fadvise(DONTNEED) on its range, buffer creation + mmap timed (Creat-ms), the I/O timed
(I/O-ms, and the CPU time it took), a few pattern bytes checked; at the end munmap + close of all
buffers timed (Close-ms). Page cache dropped before and after each mode. Row 9 loads the same
file through dmabufd (a private daemon unless --runtime-dir). Modes the kernel cannot do are
skipped with the reason. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from bench.modes import MODES, Kernel, Source
from bench.runner import MB, Row, ServiceRequest, Setup, run_dmabufd_row, run_raw_row
from bench.system import CacheDropper
from bench.testfile import BLOCK, NoDirectIO, SourceFile, prepare
from dmabufd_common.units import format_size, parse_size

ALL_MODES = tuple(range(1, len(MODES) + 2))  # 1..8 raw, 9 dmabufd
RSS_LIMIT = 32 << 20
RATIO_TARGET = 0.95


def parse_modes(text: str) -> list[int]:
    try:
        modes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"modes are numbers 1-{len(ALL_MODES)}: {text!r}") from None
    if not modes or any(mode not in ALL_MODES for mode in modes):
        raise argparse.ArgumentTypeError(f"modes are numbers 1-{len(ALL_MODES)}: {text!r}")
    return modes


def parse_chunk(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size <= 0 or size % BLOCK:
        raise argparse.ArgumentTypeError(f"the chunk must be a positive multiple of {BLOCK} (O_DIRECT): {text!r}")
    return size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load_modes", description=(__doc__ or "").splitlines()[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--file", type=Path, help="load this file (created with --size bytes of pattern if missing)")
    where.add_argument("--dir", type=Path, help="write a temporary test file here ($DMABUFD_VM_SCRATCH or /var/tmp)")
    p.add_argument("--size", type=parse_chunk, default=parse_chunk("1G"), help="test file size (default 1G)")
    p.add_argument("--chunk", type=parse_chunk, default=parse_chunk("32M"), help="bytes per buffer (default 32M)")
    p.add_argument("--modes", type=parse_modes, default=list(ALL_MODES), help="e.g. 1,6,8,9 (default all; 9: dmabufd)")
    p.add_argument("--repeat", type=int, default=1, help="runs per mode; the table shows medians (default 1)")
    p.add_argument("--verify", action="store_true", help="also compare a sha256 of all buffers with the file's")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    p.add_argument("--no-drop-caches", action="store_true", help="fadvise(DONTNEED) instead of drop_caches")
    p.add_argument("--runtime-dir", type=Path, help="use the dmabufd running here (default: start a private one)")
    p.add_argument("--method", default="auto", help="dmabufd load method (default auto)")
    p.add_argument("--heap", default="", help="dmabufd target heap (default: by --usage)")
    p.add_argument("--usage", default="model-weights", help="dmabufd usage (default model-weights)")
    return p


def finish(rows: list[Row]) -> dict[str, Any]:
    """I/O% against mode 1 (else the first mode that ran) and the dmabufd summary."""
    ran = [row for row in rows if row.status == "ok" and row.mb_s]
    raw = [row for row in ran if row.number <= len(MODES)]
    reference = next((row for row in raw if row.number == 1), raw[0] if raw else None)
    if reference is not None and reference.mb_s:
        for row in ran:
            assert row.mb_s is not None
            row.io_pct = 100 * row.mb_s / reference.mb_s
    summary: dict[str, Any] = {"reference_mode": reference.number if reference else None}
    best = max(raw, key=lambda row: row.mb_s or 0.0, default=None)
    summary["best_raw_mode"] = best.number if best else None
    service = next((row for row in ran if row.number == ALL_MODES[-1]), None)
    if service is None or best is None or not best.mb_s or not service.mb_s:
        return summary
    creat, io = best.median("creat_ms") or 0.0, best.median("io_ms") or 0.0
    best_end_to_end = best.runs[0].bytes / MB / ((creat + io) / 1000)
    measured = [run.extra["rss"]["growth"] for run in service.runs if run.extra["rss"]["pid"]]
    growth = {key: max(g.get(key, 0) for g in measured) for key in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}
    summary["dmabufd"] = {
        "method": service.runs[-1].extra["method"],
        "mb_s": service.mb_s,
        "best_raw_mb_s": best.mb_s,
        # dmabufd's wall time includes allocating the buffers; the raw I/O-ms does not.
        "ratio_to_best_raw_io": service.mb_s / best.mb_s,
        "ratio_to_best_raw_creat_plus_io": service.mb_s / best_end_to_end,
        "ratio_target": RATIO_TARGET,
        "rss_growth_bytes": growth["VmRSS"] if measured else None,
        "rss_growth_detail": growth if measured else None,
        "rss_limit_bytes": RSS_LIMIT,
    }
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def render(rows: list[Row], report: dict[str, Any]) -> str:
    f = report["file"]
    lines = [
        f"file {f['path']} ({format_size(f['size'])}, {f['fs_type']}), {report['buffers']} buffers of "
        f"{format_size(report['chunk'])}; kernel {report['kernel']}"
        + (f" (VM {report['vm_variant']})" if report["vm_variant"] else "")
        + f"; cache: {report['cache_drop']}; repeat {report['repeat']} (medians)",
    ]
    if report["udmabuf_size_limit_mb"] is not None:
        lines.append(f"udmabuf size_limit_mb {report['udmabuf_size_limit_mb']}")
    lines += [f"note: {note}" for note in f["notes"]]
    header = f"{'mode':<38} {'Creat-ms':>8} {'Close-ms':>8} {'I/O-ms':>8} {'MB/s':>7} {'I/O%':>6} {'CPU-ms':>8}"
    lines += [header, "-" * len(header)]
    for row in rows:
        name = f"{row.number} {row.label}"
        if row.status != "ok":
            lines.append(f"{name:<38} {row.status}: {row.reason}")
            continue
        pct = "-" if row.io_pct is None else f"{row.io_pct:.0f}%"
        lines.append(
            f"{name:<38} {_ms(row.median('creat_ms')):>8} {_ms(row.median('close_ms')):>8} "
            f"{_ms(row.median('io_ms')):>8} {row.mb_s or 0:>7.0f} {pct:>6} {_ms(row.median('cpu_ms')):>8}"
        )
    for row in rows:
        lines += [f"{row.number}: {note}" for note in row.notes]
    service = report["summary"].get("dmabufd")
    if service:
        rss = service["rss_growth_bytes"]
        lines.append(
            f"dmabufd ({service['method']}) / best raw (mode {report['summary']['best_raw_mode']}): "
            f"{service['ratio_to_best_raw_io']:.3f} of its I/O-only MB/s, "
            f"{service['ratio_to_best_raw_creat_plus_io']:.3f} of its Creat+I/O MB/s (target >= {RATIO_TARGET}); "
            f"daemon RSS growth {'unknown' if rss is None else format_size(rss)} (limit {format_size(RSS_LIMIT)})"
        )
        if service["rss_growth_detail"]:
            detail = ", ".join(f"{key} {format_size(value)}" for key, value in service["rss_growth_detail"].items())
            lines.append(f"daemon RSS peak growth by kind: {detail}")
    lines.append("MB/s: 10^6 bytes per second of I/O-ms; CPU-ms: user+sys of the I/O (row 9: daemon + client)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    if args.repeat < 1:
        raise ValueError("--repeat must be at least 1")
    source = prepare(args.file, args.size, args.dir, want_sha256=args.verify)
    kernel = Kernel.probe(args.chunk)
    dropper = CacheDropper(not args.no_drop_caches)
    direct_fd = os.open(source.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    buffered_fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    setup = Setup(source, Source(direct_fd, buffered_fd), args.chunk, dropper, args.verify, args.repeat)
    rows: list[Row] = []
    try:
        for mode_type in MODES:
            if mode_type.number in args.modes:
                rows.append(run_raw_row(mode_type(kernel), setup))
        if ALL_MODES[-1] in args.modes:
            request = ServiceRequest(method=args.method, heap=args.heap, usage=args.usage)
            rows.append(run_dmabufd_row(args.runtime_dir, setup, request))
    finally:
        os.close(direct_fd)
        os.close(buffered_fd)
        kernel.close()
        source.cleanup()
    report = build_report(args, source, kernel, dropper, rows)
    return rows, report


def build_report(
    args: argparse.Namespace, source: SourceFile, kernel: Kernel, dropper: CacheDropper, rows: list[Row]
) -> dict[str, Any]:
    summary = finish(rows)
    limit = kernel.udmabuf_size_limit
    return {
        "tool": "bench.load_modes",
        "kernel": platform.release(),
        "vm_variant": os.environ.get("DMABUFD_VM_VARIANT") if os.environ.get("DMABUFD_IN_VM") == "1" else None,
        "file": {
            "path": str(source.path),
            "size": source.size,
            "fs_type": source.fs_type,
            "generated": source.generated,
            "sha256": source.sha256,
            "notes": source.notes,
        },
        "chunk": args.chunk,
        "buffers": -(-source.size // args.chunk),
        "repeat": args.repeat,
        "verify_sha256": args.verify,
        "cache_drop": dropper.how,
        "udmabuf_size_limit_mb": None if limit is None else limit >> 20,
        "heap": None if kernel.heap is not None else kernel.heap_missing,
        "udmabuf": None if kernel.udmabuf is not None else kernel.udmabuf_missing,
        "modes": [row.as_json() for row in rows],
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rows, report = run(args)
    except (NoDirectIO, ValueError, OSError) as error:
        print(f"bench.load_modes: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else render(rows, report))
    return 1 if any(row.status == "failed" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
