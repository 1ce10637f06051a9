"""dmabufd beside the loaders it is judged against, measured side by side in one run.

    python -m bench.compare [--size 512M] [--model-size SIZE] [--repeat 5] [--json] [--dir DIR]
                            [--config TOML] [--depth 8] [--block 16M] [--fio-depths 1,4,8,16,32]
                            [--fio-engine auto] [--no-fio] [--groups file,model-cold,model-warm]
                            [--no-drop-caches]

Three groups of rows, each against a reference row:

- file (cold, one generated file): fio at --depth x --block with O_DIRECT (the reference), dmabufd
  LoadFile, dmabufd LoadFile again in daemons with a memfd reserve the size of the file (each
  pass once the reserve is prepared; not with --config), a raw O_DIRECT reader written here at
  the same depth (into reused buffers, and into a fresh memfd as the daemon does), and fio at the
  other depths of the sweep.
- model-cold / model-warm (one generated safetensors file): safetensors.numpy.load_file (the
  reference), dmabufd LoadModel until every tensor is a numpy array, a second client's LoadModel
  of the same model (cold only; its reference is the first load), safe_open(framework="numpy")
  with every tensor, and dmabufd LoadFile of the same file.

Rows run in alternating rounds (bench.rounds): ratios are per round, summaries are medians with
min-max. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import fio as fio_runner
from bench.compare_render import GROUP_TITLES, render, render_markdown
from bench.load_modes import parse_chunk
from bench.modelfile import ModelFile, write_model
from bench.passes import SAFETENSORS_CALLS, Cache, CacheState, Pass, fio_pass, raw_pass, safetensors_pass
from bench.rawread import ReusedBuffers
from bench.rounds import FIO_PREFIX, Row, RowSpec, Status, Step, best_fio, comparisons, pair_ratios, run_rounds
from bench.service_passes import Service, loadfile_pass, loadmodel_pass
from bench.system import CacheDropper
from bench.testfile import NoDirectIO, SourceFile, default_dir, fs_type, prepare
from dmabufd_client.client import LOAD_METHODS
from dmabufd_common.units import format_size

TOOL = "bench.compare"
SCHEMA_VERSION = 1
GROUPS = tuple(GROUP_TITLES)


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


def parse_positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a positive whole number: {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--size", type=parse_chunk, default=parse_chunk("512M"), help="raw test file (512M)")
    p.add_argument("--model-size", type=parse_chunk, help="safetensors test model (default: --size)")
    p.add_argument("--repeat", type=parse_positive, default=5, help="rounds; medians of the paired passes (5)")
    p.add_argument("--dir", type=Path, help="where the test files go ($DMABUFD_VM_SCRATCH, else /var/tmp)")
    p.add_argument("--config", type=Path, help="TOML config for the private daemons (default: built-in)")
    p.add_argument(
        "--load-method",
        choices=list(LOAD_METHODS.values()),
        default="auto",
        help="the LoadFile row's method (auto: the daemon's choice)",
    )
    p.add_argument("--depth", type=parse_positive, default=8, help="requests in flight, fio and the raw reader (8)")
    p.add_argument("--block", type=parse_chunk, default=parse_chunk("16M"), help="bytes per request (16M)")
    p.add_argument(
        "--fio-depths", type=parse_depths, default=parse_depths("1,4,8,16,32"), help="fio depths to sweep (1,4,8,16,32)"
    )
    p.add_argument(
        "--fio-engine", choices=("auto", *fio_runner.ENGINES), default="auto", help="auto: io_uring, else libaio"
    )
    p.add_argument("--no-fio", action="store_true", help="skip the fio rows (the raw reader is the reference)")
    p.add_argument("--groups", type=parse_groups, default=list(GROUPS), help=f"some of {','.join(GROUPS)}")
    p.add_argument("--no-drop-caches", action="store_true", help="cold: fadvise(DONTNEED) instead of drop_caches")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="every pass and the medians as JSON")
    output.add_argument("--markdown", action="store_true", help="also print the tables in Markdown")
    p.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: print a saved --json report")
    return p


@dataclass
class Bench:
    """What the rows share: the files, the cache, the daemons, fio."""

    args: argparse.Namespace
    scratch: Path
    cache: Cache
    service: Service
    source: SourceFile | None = None
    model: ModelFile | None = None
    fio: fio_runner.Fio | None = None
    fio_missing: str | None = None
    reused: ReusedBuffers | None = None
    # The LoadFile row again, in daemons with a memfd reserve the size of the file.
    reserved: Service | None = None
    reserve_missing: str | None = None

    def close(self) -> None:
        if self.reused is not None:
            self.reused.close()
        self.service.cleanup()
        if self.reserved is not None:
            self.reserved.cleanup()
        shutil.rmtree(self.scratch, ignore_errors=True)


def setup(args: argparse.Namespace) -> Bench:
    installed = False
    if "file" in args.groups and not args.no_fio:
        # First, so that a missing fio fails before minutes of writing files.
        installed = fio_runner.install_fio()
    parent = args.dir if args.dir is not None else default_dir()
    scratch = Path(tempfile.mkdtemp(prefix="dmabufd-compare-", dir=parent))
    try:
        bench = Bench(args, scratch, Cache(CacheDropper(not args.no_drop_caches)), Service(args.config, scratch))
        if args.no_fio:
            bench.fio_missing = "--no-fio"
        elif "file" not in args.groups:
            bench.fio_missing = "no file group"
        if "file" in args.groups:
            bench.source = prepare(scratch / "load.bin", args.size, None, want_sha256=False)
            if not args.no_fio:
                bench.fio = fio_runner.probe(bench.source.path, bench.source.size, args.fio_engine, installed)
            bench.reused = ReusedBuffers(args.depth, args.block)
            if args.config is not None:
                bench.reserve_missing = "--config given: the reserve row writes its own config"
            else:
                config = scratch / "reserve.toml"
                page = os.sysconf("SC_PAGE_SIZE")
                whole_pages = -(-bench.source.size // page) * page  # the LoadFile buffer's size
                # This uid is an admin of its daemons: told when the reserve is ready.
                config.write_text(
                    f"[heaps]\nmemfd_reserve = [{whole_pages}]\n[clients]\nadmin_uids = [{os.getuid()}]\n"
                )
                bench.reserved = Service(config, scratch, reserved=True)
        if "model-cold" in args.groups or "model-warm" in args.groups:
            bench.model = write_model(scratch / "model.safetensors", args.model_size or args.size)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return bench


def _single(key: str, run: Callable[[], Pass]) -> Step:
    return Step((key,), lambda: [run()])


def file_rows(bench: Bench, rows: dict[str, Row], steps: list[Step]) -> None:
    args, source, cache = bench.args, bench.source, bench.cache
    assert source is not None
    depth, block = args.depth, args.block
    engine = f"{bench.fio.engine}, " if bench.fio is not None else ""
    reference = f"{FIO_PREFIX}{depth}" if bench.fio is not None else "raw-reused"

    def add(key: str, label: str, run: Callable[[], Pass] | None, missing: str | None = None) -> None:
        rows[key] = Row(RowSpec(key, label, "file", None if key == reference else reference))
        if run is None:
            rows[key].status, rows[key].reason = Status.SKIPPED, missing or bench.fio_missing
        else:
            steps.append(_single(key, run))

    def fio_row(level: int) -> None:
        fio = bench.fio
        run = None if fio is None else lambda: fio_pass(fio, cache, source, block, level)
        add(f"{FIO_PREFIX}{level}", f"fio, depth {level} x {format_size(block)} ({engine}--direct=1)", run)

    fio_row(depth)
    method = bench.args.load_method
    add(
        "loadfile",
        "dmabufd LoadFile" + ("" if method == "auto" else f" ({method})"),
        lambda: loadfile_pass(bench.service, cache, source, CacheState.COLD, method),
    )
    reserved = bench.reserved
    add(
        "loadfile-reserve",
        "dmabufd LoadFile, memfd reserve" + ("" if method == "auto" else f" ({method})"),
        None if reserved is None else lambda: loadfile_pass(reserved, cache, source, CacheState.COLD, method),
        bench.reserve_missing,
    )
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


def model_rows(bench: Bench, state: CacheState, rows: dict[str, Row], steps: list[Step]) -> None:
    model, cache, service = bench.model, bench.cache, bench.service
    assert model is not None
    # dmabufd's LoadFile of the model file is sampled against the file's own bytes.
    model_source = SourceFile(model.path, model.size, False, False, fs_type(model.path), None, [])
    group, reference = f"model-{state.value}", f"st-load-file-{state.value}"

    def add(key: str, label: str, ratio_to: str = reference) -> None:
        rows[key] = Row(RowSpec(key, label, group, None if key == reference else ratio_to))

    def safetensors_step(key: str, call: str) -> Step:
        return _single(key, lambda: safetensors_pass(cache, model, state, call))

    load_file_call, safe_open_call = SAFETENSORS_CALLS
    add(reference, "safetensors.numpy.load_file")
    steps.append(safetensors_step(reference, load_file_call))
    first = f"loadmodel-{state.value}"
    add(first, "dmabufd LoadModel, every tensor an array")
    # The second client is measured in the cold group only: sharing does not read the file.
    second = state is CacheState.COLD
    keys: tuple[str, ...] = (first,)
    if second:
        add("loadmodel-second", "dmabufd LoadModel, second client (ratio: to the first)", first)
        keys = (first, "loadmodel-second")
    steps.append(Step(keys, lambda: loadmodel_pass(service, cache, model, state, second)))
    safe_open = f"safe-open-{state.value}"
    add(safe_open, 'safe_open(framework="numpy"), every tensor')
    steps.append(safetensors_step(safe_open, safe_open_call))
    loadfile = f"loadfile-model-{state.value}"
    add(loadfile, "dmabufd LoadFile of the model file")
    steps.append(_single(loadfile, lambda: loadfile_pass(service, cache, model_source, state)))


def plan_rows(bench: Bench) -> tuple[dict[str, Row], list[Step]]:
    rows: dict[str, Row] = {}
    steps: list[Step] = []
    if "file" in bench.args.groups:
        file_rows(bench, rows, steps)
    for state in CacheState:
        if f"model-{state.value}" in bench.args.groups:
            model_rows(bench, state, rows, steps)
    return rows, steps


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
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    return {"loadavg": list(os.getloadavg()), "qemu_processes": qemu, "mem_available_bytes": available}


def cache_check(rows: dict[str, Row]) -> dict[str, float | None]:
    """The most of the file any cold pass found cached, and the least any warm pass found."""
    cold: list[float] = []
    warm: list[float] = []
    for row in rows.values():
        for one in row.passes:
            fraction = one.result.extra.get("cached_before")
            if isinstance(fraction, float):
                (warm if row.spec.group == "model-warm" else cold).append(fraction)
    return {"cold_max": max(cold, default=None), "warm_min": min(warm, default=None)}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_report(bench: Bench, rows: dict[str, Row], before: dict[str, Any], started: str) -> dict[str, Any]:
    args, source, model, fio = bench.args, bench.source, bench.model, bench.fio
    references = {row.spec.group: row.spec.key for row in rows.values() if row.spec.reference is None}
    found = [comparison.evaluate(rows) for comparison in comparisons(rows, args.depth)]
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
            "config": None if args.config is None else str(args.config),
            "load_method": args.load_method,
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(render_markdown(saved) if args.markdown else render(saved))
        return 0
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    before = machine_state()
    try:
        bench = setup(args)
    except (fio_runner.FioMissing, fio_runner.FioFailed, NoDirectIO, ValueError, OSError) as error:
        print(f"{TOOL}: {error}", file=sys.stderr)
        return 2
    try:
        rows, steps = plan_rows(bench)
        run_rounds(rows, steps, args.repeat, TOOL)
    finally:
        bench.close()
    pair_ratios(rows)
    report = build_report(bench, rows, before, started)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report) + ("\n\n" + render_markdown(report) if args.markdown else ""))
    return 1 if any(row.status is Status.FAILED for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
