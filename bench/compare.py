"""dmabufd beside the loaders it is judged against, measured side by side in one run.

    python -m bench.compare [--size 512M] [--model-size SIZE] [--repeat 5] [--json] [--dir DIR]
                            [--runtime-dir DIR | --config TOML] [--depth 8] [--block 16M]
                            [--fio-depths 1,4,8,16,32] [--fio-engine auto] [--no-fio]
                            [--groups file,model-cold,model-warm] [--no-drop-caches]

Three groups of rows, each against a reference row:

- file (cold, one generated file): fio at --depth x --block with O_DIRECT (the reference), dmabufd
  LoadFile, a raw O_DIRECT reader written here at the same depth (into reused buffers, and into
  a fresh memfd as the daemon does), and fio at the other depths of the sweep.
- model-cold / model-warm (one generated safetensors file): safetensors.numpy.load_file (the
  reference), dmabufd LoadModel until every tensor is a numpy array, a second client's LoadModel
  of the same model (cold only; its reference is the first load), safe_open(framework="numpy")
  with every tensor, and dmabufd LoadFile of the same file.

Each round runs every row once, in that order, and the next round again (ABAB, not AABB): the
disk of a shared VM drifts by 2x within minutes, so only passes made side by side are compared.
Ratios are per round (a row's GB/s over its reference's in the same round); the table shows
medians with min-max. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fio as fio_runner
from bench.load_modes import parse_chunk
from bench.modelfile import ModelFile, write_model
from bench.passes import (
    COLD,
    WARM,
    Cache,
    Pass,
    Service,
    Skip,
    fio_pass,
    loadfile_pass,
    loadmodel_pass,
    raw_pass,
    safetensors_pass,
)
from bench.rawread import ReusedBuffers
from bench.system import CacheDropper
from bench.testfile import NoDirectIO, SourceFile, default_dir, fs_type, prepare
from dmabufd_common.units import format_size

TOOL = "bench.compare"
SCHEMA_VERSION = 1
GB = 1_000_000_000
GIB = 1 << 30
WIDTH = 60  # of the row labels in the table
GROUPS = ("file", "model-cold", "model-warm")
GROUP_TITLES = {
    "file": "cold file",
    "model-cold": "safetensors model, cold (not in the page cache)",
    "model-warm": "safetensors model, warm (all in the page cache)",
}


def parse_depths(text: str) -> list[int]:
    try:
        depths = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths are positive numbers, comma-separated: {text!r}") from None
    if not depths or min(depths) < 1:
        raise argparse.ArgumentTypeError(f"depths are positive numbers, comma-separated: {text!r}")
    return depths


def parse_groups(text: str) -> list[str]:
    groups = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [group for group in groups if group not in GROUPS]
    if not groups or unknown:
        raise argparse.ArgumentTypeError(f"groups are {', '.join(GROUPS)}: {text!r}")
    return [group for group in GROUPS if group in groups]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size", type=parse_chunk, default=parse_chunk("512M"), help="raw test file (512M)")
    p.add_argument("--model-size", type=parse_chunk, help="safetensors test model (default: --size)")
    p.add_argument("--repeat", type=int, default=5, help="rounds; medians of the paired passes (default 5)")
    p.add_argument("--dir", type=Path, help="where the test files go ($DMABUFD_VM_SCRATCH, else /var/tmp)")
    daemon = p.add_mutually_exclusive_group()
    daemon.add_argument("--runtime-dir", type=Path, help="use the dmabufd running here (default: private ones)")
    daemon.add_argument("--config", type=Path, help="TOML config for the private daemons")
    p.add_argument("--depth", type=int, default=8, help="requests in flight for fio and the raw reader (8)")
    p.add_argument("--block", type=parse_chunk, default=parse_chunk("16M"), help="bytes per request (16M)")
    p.add_argument(
        "--fio-depths", type=parse_depths, default=parse_depths("1,4,8,16,32"), help="fio depths to sweep (1,4,8,16,32)"
    )
    p.add_argument(
        "--fio-engine",
        choices=("auto", *fio_runner.ENGINES),
        default="auto",
        help="fio engine (auto: io_uring, else libaio)",
    )
    p.add_argument("--no-fio", action="store_true", help="skip the fio rows (the raw reader is the reference)")
    p.add_argument("--groups", type=parse_groups, default=list(GROUPS), help=f"some of {','.join(GROUPS)}")
    p.add_argument("--no-drop-caches", action="store_true", help="cold: fadvise(DONTNEED) instead of drop_caches")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="every pass and the medians as JSON")
    output.add_argument("--markdown", action="store_true", help="the tables in Markdown (for bench/README.md)")
    p.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: print a saved --json report")
    return p


# -- rows, rounds and their statistics -------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    group: str
    reference: str | None  # the ratio is this row's GB/s over that row's, in the same round


@dataclass
class RoundPass:
    round: int
    result: Pass
    ratio: float | None = None

    @property
    def wall_s(self) -> float:
        return self.result.wall_s

    @property
    def gb_s(self) -> float:
        return self.result.bytes / GB / self.result.wall_s

    @property
    def cpu_s_per_gib(self) -> float:
        return self.result.cpu_s / (self.result.bytes / GIB)

    @property
    def daemon_cpu_s_per_gib(self) -> float | None:
        """dmabufd rows: the daemon's own share of cpu_s (None elsewhere, or without its pid)."""
        daemon = self.result.extra.get("daemon_cpu_s")
        return daemon / (self.result.bytes / GIB) if isinstance(daemon, float | int) else None

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "wall_s": self.result.wall_s,
            "cpu_s": self.result.cpu_s,
            "bytes": self.result.bytes,
            "gb_s": self.gb_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "daemon_cpu_s_per_gib": self.daemon_cpu_s_per_gib,
            "ratio": self.ratio,
            "extra": self.result.extra,
        }


def spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class Row:
    spec: RowSpec
    status: str = "ok"  # ok | skipped | failed
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    passes: list[RoundPass] = field(default_factory=list)

    def in_round(self, number: int) -> RoundPass | None:
        return next((one for one in self.passes if one.round == number), None)

    def stat(self, name: str) -> dict[str, float] | None:
        values = [getattr(one, name) for one in self.passes]
        return spread([value for value in values if value is not None])

    @property
    def methods(self) -> list[str]:
        """What the daemon reported it did, as reported (distinct values, in order)."""
        seen: list[str] = []
        for one in self.passes:
            method = one.result.extra.get("method")
            if isinstance(method, str) and method not in seen:
                seen.append(method)
        return seen

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "label": self.spec.label,
            "group": self.spec.group,
            "reference": self.spec.reference,
            "status": self.status,
            "reason": self.reason,
            "notes": self.notes,
            "methods": self.methods,
            "wall_s": self.stat("wall_s"),
            "gb_s": self.stat("gb_s"),
            "cpu_s_per_gib": self.stat("cpu_s_per_gib"),
            "daemon_cpu_s_per_gib": self.stat("daemon_cpu_s_per_gib"),
            "ratio": self.stat("ratio"),
            "passes": [one.as_json() for one in self.passes],
        }


@dataclass(frozen=True)
class Step:
    """One thing a round runs: it fills the rows `keys` (LoadModel fills two: the first client
    and the second)."""

    keys: tuple[str, ...]
    run: Callable[[], dict[str, Pass]]


def run_rounds(rows: dict[str, Row], steps: list[Step], repeat: int) -> None:
    for number in range(repeat):
        for step in steps:
            if any(rows[key].status != "ok" for key in step.keys):
                continue
            try:
                results = step.run()
            except Skip as skip:
                for key in step.keys:
                    rows[key].status, rows[key].reason, rows[key].passes = "skipped", str(skip), []
                continue
            except Exception as error:  # any failure stays in its row; the other rows go on
                for key in step.keys:
                    rows[key].status, rows[key].reason = "failed", f"{type(error).__name__}: {error}"
                continue
            for key, result in results.items():
                rows[key].passes.append(RoundPass(number, result))
                one = rows[key].passes[-1]
                print(
                    f"{TOOL}: round {number + 1}/{repeat} {rows[key].spec.label}: "
                    f"{result.wall_s:.3f} s, {one.gb_s:.2f} GB/s",
                    file=sys.stderr,
                    flush=True,
                )


def pair_ratios(rows: dict[str, Row]) -> None:
    """Each pass's GB/s over its reference row's GB/s in the same round."""
    for row in rows.values():
        reference = rows.get(row.spec.reference) if row.spec.reference else None
        if reference is None:
            continue
        for one in row.passes:
            other = reference.in_round(one.round)
            one.ratio = one.gb_s / other.gb_s if other is not None else None


@dataclass(frozen=True)
class Comparison:
    """A figure of the acceptance list. speed: baseline's time over the subject's (>1: the
    subject is faster); time: the subject's time over the baseline's; daemon-cpu: the daemon's
    own CPU seconds per GiB (not the client's) over the baseline's CPU seconds per GiB. Per
    round, then the median."""

    name: str
    subject: str
    baseline: str
    measure: str
    target: float | None = None

    def value(self, subject: RoundPass, baseline: RoundPass) -> float | None:
        if self.measure == "speed":
            return baseline.result.wall_s / subject.result.wall_s
        if self.measure == "time":
            return subject.result.wall_s / baseline.result.wall_s
        daemon = subject.daemon_cpu_s_per_gib
        # A baseline that used no measurable CPU has no ratio.
        return daemon / baseline.cpu_s_per_gib if daemon is not None and baseline.cpu_s_per_gib else None

    def evaluate(self, rows: dict[str, Row]) -> dict[str, Any] | None:
        subject, baseline = rows.get(self.subject), rows.get(self.baseline)
        if subject is None or baseline is None:
            return None
        values: list[float] = []
        for one in subject.passes:
            other = baseline.in_round(one.round)
            value = None if other is None else self.value(one, other)
            if value is not None:
                values.append(value)
        summary = spread(values)
        met = None
        if summary is not None and self.target is not None:
            met = summary["median"] <= self.target if self.measure == "time" else summary["median"] >= self.target
        return {
            "name": self.name,
            "subject": self.subject,
            "baseline": self.baseline,
            "measure": self.measure,
            "rounds": len(values),
            "value": summary,
            "target": self.target,
            "target_met": met,
        }


def best_fio(rows: dict[str, Row]) -> str | None:
    """The fio row of the sweep with the highest median GB/s."""
    candidates = [row for key, row in rows.items() if key.startswith("fio-d") and row.passes]
    best = max(candidates, key=lambda row: (row.stat("gb_s") or {"median": 0.0})["median"], default=None)
    return best.spec.key if best is not None else None


def comparisons(rows: dict[str, Row], depth: int) -> list[Comparison]:
    fio8 = f"fio-d{depth}"
    found = [
        Comparison(f"LoadFile vs fio depth {depth}, cold", "loadfile", fio8, "speed"),
        Comparison(f"LoadFile vs raw O_DIRECT into a fresh memfd, depth {depth}", "loadfile", "raw-fresh", "speed"),
        Comparison(f"LoadFile daemon CPU s/GiB over fio depth {depth}'s", "loadfile", fio8, "daemon-cpu"),
    ]
    best = best_fio(rows)
    if best is not None and best != fio8:
        found.insert(1, Comparison(f"LoadFile vs fio at its best depth ({best[5:]}), cold", "loadfile", best, "speed"))
    for state in (COLD, WARM):
        found += [
            Comparison(
                f"LoadModel time over LoadFile's, same file, {state}",
                f"loadmodel-{state}",
                f"loadfile-model-{state}",
                "time",
                1.1,
            ),
            Comparison(
                f"LoadModel vs safetensors.numpy.load_file, {state}",
                f"loadmodel-{state}",
                f"st-load-file-{state}",
                "speed",
                1.3 if state == COLD else 1.5,
            ),
            Comparison(
                f'LoadModel vs safe_open(framework="numpy"), {state}',
                f"loadmodel-{state}",
                f"safe-open-{state}",
                "speed",
            ),
        ]
    found.append(Comparison("LoadModel, second client vs the first", "loadmodel-second", "loadmodel-cold", "speed", 10))
    return found


# -- the set-up and the rows ------------------------------------------------------------------------


@dataclass
class Bench:
    """What the rows share: the files, the cache, the daemon, fio."""

    args: argparse.Namespace
    scratch: Path
    cache: Cache
    service: Service
    source: SourceFile | None = None
    model: ModelFile | None = None
    model_source: SourceFile | None = None
    fio: fio_runner.Fio | None = None
    fio_missing: str | None = None
    reused: ReusedBuffers | None = None

    def close(self) -> None:
        if self.reused is not None:
            self.reused.close()
        self.service.cleanup()
        shutil.rmtree(self.scratch, ignore_errors=True)


def setup(args: argparse.Namespace) -> Bench:
    installed = False
    if "file" in args.groups and not args.no_fio:
        # First, so that a missing fio fails before minutes of writing files.
        installed = fio_runner.install_fio()
    parent = args.dir if args.dir is not None else default_dir()
    scratch = Path(tempfile.mkdtemp(prefix="dmabufd-compare-", dir=parent))
    try:
        cache = Cache(CacheDropper(not args.no_drop_caches))
        bench = Bench(args, scratch, cache, Service(args.runtime_dir, args.config, scratch))
        if args.no_fio:
            bench.fio_missing = "--no-fio"
        elif "file" not in args.groups:
            bench.fio_missing = "no file group"
        if "file" in args.groups:
            bench.source = prepare(scratch / "load.bin", args.size, None, want_sha256=False)
            if not args.no_fio:
                bench.fio = fio_runner.probe(bench.source.path, bench.source.size, args.fio_engine, installed)
            bench.reused = ReusedBuffers(args.depth, args.block)
        if "model-cold" in args.groups or "model-warm" in args.groups:
            model = write_model(scratch / "model.safetensors", args.model_size or args.size)
            bench.model = model
            bench.model_source = SourceFile(model.path, model.size, False, False, fs_type(model.path), None, [])
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return bench


def _single(key: str, run: Callable[[], Pass]) -> Step:
    return Step((key,), lambda: {key: run()})


def file_rows(bench: Bench, rows: dict[str, Row], steps: list[Step]) -> None:
    args, source, cache = bench.args, bench.source, bench.cache
    assert source is not None
    depth, block = args.depth, args.block
    engine = f"{bench.fio.engine}, " if bench.fio is not None else ""
    reference = f"fio-d{depth}" if bench.fio is not None else "raw-reused"

    def add(key: str, label: str, run: Callable[[], Pass] | None) -> None:
        rows[key] = Row(RowSpec(key, label, "file", None if key == reference else reference))
        if run is None:
            rows[key].status, rows[key].reason = "skipped", bench.fio_missing or "fio is not available"
        else:
            steps.append(_single(key, run))

    def fio_row(level: int) -> None:
        fio = bench.fio
        run = None if fio is None else lambda: fio_pass(fio, cache, source, block, level)
        add(f"fio-d{level}", f"fio, depth {level} x {format_size(block)} ({engine}--direct=1)", run)

    fio_row(depth)
    add("loadfile", "dmabufd LoadFile", lambda: loadfile_pass(bench.service, cache, source, COLD))
    add(
        "raw-reused",
        f"raw O_DIRECT, depth {depth} x {format_size(block)}, reused buffers",
        lambda: raw_pass(cache, source, block, depth, bench.reused),
    )
    add(
        "raw-fresh",
        f"raw O_DIRECT, depth {depth} x {format_size(block)}, fresh memfd",
        lambda: raw_pass(cache, source, block, depth, None),
    )
    for level in args.fio_depths:
        if level != depth:
            fio_row(level)


def model_rows(bench: Bench, state: str, rows: dict[str, Row], steps: list[Step]) -> None:
    model, model_source, cache, service = bench.model, bench.model_source, bench.cache, bench.service
    assert model is not None
    assert model_source is not None
    group, reference = f"model-{state}", f"st-load-file-{state}"

    def add(key: str, label: str, ratio_to: str | None = reference) -> None:
        rows[key] = Row(RowSpec(key, label, group, None if key == reference else ratio_to))

    add(reference, "safetensors.numpy.load_file")
    steps.append(_single(reference, lambda: safetensors_pass(cache, model, state, "load_file")))
    first = f"loadmodel-{state}"
    add(first, "dmabufd LoadModel, every tensor an array")
    keys: tuple[str, ...] = (first,)
    if state == COLD:
        add("loadmodel-second", "dmabufd LoadModel, second client (ratio: to the first)", first)
        keys = (first, "loadmodel-second")

    def load_model() -> dict[str, Pass]:
        passes = loadmodel_pass(service, cache, model, state, second=state == COLD)
        return {key: passes[which] for key, which in zip(keys, ("first", "second"), strict=False) if which in passes}

    steps.append(Step(keys, load_model))
    add(f"safe-open-{state}", 'safe_open(framework="numpy"), every tensor')
    steps.append(_single(f"safe-open-{state}", lambda: safetensors_pass(cache, model, state, "safe_open")))
    add(f"loadfile-model-{state}", "dmabufd LoadFile of the model file")
    steps.append(_single(f"loadfile-model-{state}", lambda: loadfile_pass(service, cache, model_source, state)))


def plan_rows(bench: Bench) -> tuple[dict[str, Row], list[Step]]:
    rows: dict[str, Row] = {}
    steps: list[Step] = []
    if "file" in bench.args.groups:
        file_rows(bench, rows, steps)
    for state in (COLD, WARM):
        if f"model-{state}" in bench.args.groups:
            model_rows(bench, state, rows, steps)
    return rows, steps


# -- the report -------------------------------------------------------------------------------------


def machine_state() -> dict[str, Any]:
    """Load average, QEMU guests running, memory available: this machine is shared."""
    qemu = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                qemu += (entry / "comm").read_text().startswith("qemu-system")
            except OSError:
                continue
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"loadavg": list(os.getloadavg()), "qemu_processes": qemu, "mem_available_bytes": available}


def cache_check(rows: dict[str, Row]) -> dict[str, float | None]:
    """The most of the file any cold pass found cached, and the least any warm pass found."""
    cold: list[float] = []
    warm: list[float] = []
    for row in rows.values():
        for one in row.passes:
            fraction = one.result.extra.get("cached_before")
            if isinstance(fraction, float | int):
                (warm if row.spec.group == "model-warm" else cold).append(float(fraction))
    return {"cold_max": max(cold, default=None), "warm_min": min(warm, default=None)}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_report(bench: Bench, rows: dict[str, Row], before: dict[str, Any], started: str) -> dict[str, Any]:
    args, source, model = bench.args, bench.source, bench.model
    references = {}
    for row in rows.values():
        if row.spec.reference is None:
            references[row.spec.group] = row.spec.key
    found = [item for item in (c.evaluate(rows) for c in comparisons(rows, args.depth)) if item is not None]
    fio = bench.fio
    return {
        "tool": TOOL,
        "schema_version": SCHEMA_VERSION,
        "date": started,
        "kernel": platform.release(),
        "versions": {name: _version(name) for name in ("safetensors", "numpy", "dmabufd-client")},
        "machine": {"cpus": os.cpu_count(), "before": before, "after": machine_state()},
        "options": {
            "size": args.size,
            "model_size": args.model_size or args.size,
            "repeat": args.repeat,
            "depth": args.depth,
            "block": args.block,
            "fio_depths": args.fio_depths,
            "groups": args.groups,
            "runtime_dir": None if args.runtime_dir is None else str(args.runtime_dir),
            "config": None if args.config is None else str(args.config),
        },
        "cache": {"cold": bench.cache.how_cold, "warm": bench.cache.how_warm},
        "daemon": bench.service.how,
        "files": {
            "raw": None
            if source is None
            else {"path": str(source.path), "size": source.size, "fs_type": source.fs_type, "notes": source.notes},
            "model": None
            if model is None
            else {
                "path": str(model.path),
                "size": model.size,
                "fs_type": fs_type(model.path),
                "tensors": len(model.tensors),
                "dtypes": model.dtypes,
                "notes": model.notes,
            },
        },
        "fio": None
        if fio is None
        else {"path": fio.path, "version": fio.version, "engine": fio.engine, "installed_now": fio.installed_now},
        "fio_missing": bench.fio_missing,
        "rows": [row.as_json() for row in rows.values()],
        "summary": {
            "references": references,
            "fio_best": best_fio(rows),
            "cached_before": cache_check(rows),
            "comparisons": found,
        },
    }


def _spread_text(value: dict[str, float] | None, digits: int, suffix: str = "") -> str:
    if value is None:
        return "-"
    low, high = value["min"], value["max"]
    return f"{value['median']:.{digits}f}{suffix} [{low:.{digits}f}-{high:.{digits}f}]"


_STANDARD_FIELDS = frozenset({"method", "bytes", "wall_seconds", "cpu_seconds", "verified", "shared"})


def reported_text(row: dict[str, Any]) -> str:
    """What the daemon said it did: the method(s) and any other field its result carries."""
    passes = row["passes"]
    if not passes or "reported" not in passes[-1]["extra"]:
        return ""
    parts = ["/".join(row["methods"])]
    shared = [one["extra"].get("shared") for one in passes]
    if row["key"] == "loadmodel-second":
        parts.append("shared" if all(shared) else "NOT shared in some passes: loaded again")
    elif any(shared):
        parts.append("SHARED in some passes: nothing was loaded")
    for key, value in passes[-1]["extra"]["reported"].items():
        if key not in _STANDARD_FIELDS and key != "read_only_enforced":
            parts.append(f"{key} {_field_text(key, value)}")
    return ", ".join(parts)


def _field_text(key: str, value: Any) -> str:
    """A field of a load result, short enough for a table cell (the JSON keeps it whole)."""
    pieces = isinstance(value, list) and value and all(isinstance(item, dict) for item in value)
    if pieces and all(isinstance(item.get("length"), int) for item in value):
        # Pieces of the file, each with a length: bytes per kind of piece.
        totals: dict[str, int] = {}
        for item in value:
            kind = "/".join(str(field) for field in item.values() if isinstance(field, str)) or "?"
            totals[kind] = totals.get(kind, 0) + item["length"]
        return f"{len(value)}: " + " + ".join(f"{kind} {format_size(size)}" for kind, size in totals.items())
    if isinstance(value, list | dict):
        return json.dumps(value)
    if isinstance(value, int) and not isinstance(value, bool) and "bytes" in key:
        return format_size(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def row_cells(row: dict[str, Any]) -> list[str]:
    """label, wall s, GB/s, CPU s/GiB, the daemon's share of it, ratio, reported; for a row that
    did not run: label and why."""
    label = row["label"] + (" (reference)" if row["reference"] is None else "")
    if row["status"] != "ok":
        return [label, f"{row['status']}: {row['reason']}"]
    ratio = "" if row["reference"] is None else _spread_text(row["ratio"], 2, "x")
    daemon = row.get("daemon_cpu_s_per_gib")
    return [
        label,
        _spread_text(row["wall_s"], 3),
        _spread_text(row["gb_s"], 2),
        _spread_text(row["cpu_s_per_gib"], 3),
        "" if daemon is None else f"{daemon['median']:.3f}",
        ratio,
        reported_text(row),
    ]


def target_text(item: dict[str, Any]) -> str:
    if item["target"] is None:
        return ""
    sign = "<=" if item["measure"] == "time" else ">="
    return f"target {sign} {item['target']}: {'met' if item['target_met'] else 'NOT met'}"


def render(report: dict[str, Any]) -> str:
    """The report as a table (from a run, or from the JSON of one: --render)."""
    machine = report["machine"]
    before, after = machine["before"], machine["after"]
    lines = [
        f"{TOOL} {report['date']}, kernel {report['kernel']}, {machine['cpus']} CPUs; load average "
        f"{' '.join(f'{v:.2f}' for v in before['loadavg'])} at start, {after['loadavg'][0]:.2f} at end; "
        f"qemu-system processes {before['qemu_processes']} at start, {after['qemu_processes']} at end",
    ]
    files = report["files"]
    if files["raw"]:
        raw = files["raw"]
        lines.append(f"file: {raw['path']} ({format_size(raw['size'])}, {raw['fs_type']})")
    if files["model"]:
        model = files["model"]
        lines.append(
            f"model: {model['path']} ({format_size(model['size'])}, {model['fs_type']}, {model['tensors']} tensors: "
            f"{'/'.join(model['dtypes'])})"
        )
        lines += [f"note: {note}" for note in model["notes"]]
    lines.append(f"cold: {report['cache']['cold']}; warm: {report['cache']['warm']}")
    checked = report["summary"].get("cached_before") or {"cold_max": None, "warm_min": None}
    if checked["cold_max"] is not None or checked["warm_min"] is not None:
        cold = "-" if checked["cold_max"] is None else f"{checked['cold_max']:.0%}"
        warm = "-" if checked["warm_min"] is None else f"{checked['warm_min']:.0%}"
        lines.append(f"cached before a pass (mincore): cold at most {cold} of the file, warm at least {warm}")
    fio = report["fio"]
    fio_text = f"{fio['version']} ({fio['engine']})" if fio else f"not run ({report['fio_missing']})"
    lines.append(f"fio: {fio_text}; dmabufd: {report['daemon']}")
    lines.append(
        f"{report['options']['repeat']} rounds, every row once per round in the order below; medians "
        "[min-max]; ratio: the row's GB/s over its reference's in the same round"
    )
    header = f"{'row':<{WIDTH}} {'wall s':>19} {'GB/s':>16} {'CPU s/GiB':>19} {'daemon':>6} {'ratio':>19}  reported"
    for group in GROUPS:
        members = [row for row in report["rows"] if row["group"] == group]
        if not members:
            continue
        lines += ["", f"== {GROUP_TITLES[group]}", header]
        for row in members:
            cells = row_cells(row)
            if len(cells) == 2:
                lines.append(f"{cells[0]:<{WIDTH}} {cells[1]}")
                continue
            label, wall, rate, cpu, daemon, ratio, reported = cells
            lines.append(f"{label:<{WIDTH}} {wall:>19} {rate:>16} {cpu:>19} {daemon:>6} {ratio:>19}  {reported}")
    lines += ["", "== comparisons (per round, then the median [min-max])"]
    for item in report["summary"]["comparisons"]:
        value = "not measured" if item["value"] is None else _spread_text(item["value"], 2, "x")
        lines.append(f"{item['name']:<70} {value}  {target_text(item)}".rstrip())
    if report["summary"]["fio_best"]:
        lines.append(f"fio's best depth: {report['summary']['fio_best'][5:]}")
    lines.append(
        "GB/s: 10^9 bytes/s. CPU s/GiB: for dmabufd the daemon's (/proc/<pid>/stat, alone: daemon) plus the client's, "
        "for fio its usr+sys, for the others this process's rusage"
    )
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """The groups and comparisons as Markdown tables (the header lines are render()'s)."""
    lines: list[str] = []
    for group in GROUPS:
        members = [row for row in report["rows"] if row["group"] == group]
        if not members:
            continue
        lines += [
            "",
            f"{GROUP_TITLES[group]}:",
            "",
            "| row | wall s | GB/s | CPU s/GiB | daemon CPU s/GiB | ratio | reported |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in members:
            cells = [cell.replace("|", "\\|") for cell in row_cells(row)]
            lines.append("| " + " | ".join(cells) + " |" + "|" * (7 - len(cells)))
    lines += ["", "| comparison (per round, then the median [min-max]) | value | target |", "| --- | ---: | --- |"]
    for item in report["summary"]["comparisons"]:
        value = "not measured" if item["value"] is None else _spread_text(item["value"], 2, "x")
        lines.append(f"| {item['name']} | {value} | {target_text(item)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(render_markdown(saved) if args.markdown else render(saved))
        return 0
    if args.repeat < 1 or args.depth < 1:
        print(f"{TOOL}: --repeat and --depth must be at least 1", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = machine_state()
    try:
        bench = setup(args)
    except (fio_runner.FioMissing, fio_runner.FioFailed, NoDirectIO, ValueError, OSError) as error:
        print(f"{TOOL}: {error}", file=sys.stderr)
        return 2
    try:
        rows, steps = plan_rows(bench)
        run_rounds(rows, steps, args.repeat)
    finally:
        bench.close()
    pair_ratios(rows)
    report = build_report(bench, rows, before, started)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report) + ("\n" + render_markdown(report) if args.markdown else ""))
    return 1 if any(row.status == "failed" for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
