"""fio, the reference reader of bench.compare: found (installed when missing and root), run on
the test file with O_DIRECT at one queue depth, its JSON report read.

fio reads into its own buffers (iodepth x bs, allocated before its clock starts and reused), so
its figures are the disk's speed with O_DIRECT and no memory to fill. Its CPU figure is its own:
usr_cpu and sys_cpu are percentages of the job's runtime.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.vm.dmabufd_vm import VMError, ensure_dependencies

FIO_PACKAGE = "fio"  # the Debian package
ENGINES = ("io_uring", "libaio")
RUN_TIMEOUT_S = 1800.0
PROBE_BYTES = 1 << 20


class FioMissing(Exception):
    """fio is not installed and cannot be installed here: the message says how to get it."""


class FioFailed(Exception):
    """fio ran and reported an error."""


@dataclass(frozen=True)
class Fio:
    path: str
    version: str
    engine: str
    installed_now: bool


@dataclass(frozen=True)
class FioRun:
    depth: int
    block: int
    bytes: int
    runtime_s: float  # fio's job runtime: the I/O, not its start-up
    cpu_s: float  # (usr_cpu + sys_cpu)% of that runtime
    usr_pct: float
    sys_pct: float
    process_cpu_s: float  # the whole fio process (start-up and buffer set-up included), from wait4
    process_wall_s: float
    command: list[str]


def install_fio() -> bool:
    """Make sure fio is on PATH. When it is not, install the Debian package the way the VM
    harness installs its own (ensure_dependencies: apt-get as root, waiting for apt's lock if
    another install holds it); not root, or the install fails: FioMissing with the command.
    Returns whether it installed."""
    if shutil.which("fio") is not None:
        return False
    try:
        ensure_dependencies(sys.stderr, [FIO_PACKAGE])
    except (VMError, subprocess.CalledProcessError, OSError) as error:
        raise FioMissing(f"fio is not installed and could not be installed: {error}") from None
    if shutil.which("fio") is None:
        raise FioMissing(f"the {FIO_PACKAGE} package is installed but fio is not on PATH")
    return True


def _report(stdout: str) -> dict[str, Any]:
    # fio may print warnings on stdout before its JSON.
    start = stdout.find("{")
    if start < 0:
        raise FioFailed(f"no JSON in fio's output: {stdout[-500:]!r}")
    try:
        report: dict[str, Any] = json.loads(stdout[start:])
    except json.JSONDecodeError as error:
        raise FioFailed(f"fio's JSON does not parse ({error}): {stdout[-500:]!r}") from None
    return report


def command(fio: str, engine: str, path: Path, *, size: int, block: int, depth: int) -> list[str]:
    return [
        fio,
        "--name=bench-compare",
        f"--filename={path}",
        "--readonly",
        "--rw=read",
        f"--bs={block}",
        f"--size={size}",
        f"--iodepth={depth}",
        "--direct=1",
        f"--ioengine={engine}",
        "--numjobs=1",
        "--output-format=json",
    ]


def parse_job(report: dict[str, Any], depth: int, block: int) -> tuple[int, float, float, float]:
    """(bytes read, runtime seconds, usr %, sys %) of the single job of a report."""
    jobs = report.get("jobs") or []
    if len(jobs) != 1:
        raise FioFailed(f"fio reported {len(jobs)} jobs, expected 1")
    job = jobs[0]
    if job.get("error"):
        raise FioFailed(f"fio job error {job['error']} (depth {depth}, bs {block})")
    read = job["read"]
    return int(read["io_bytes"]), float(read["runtime"]) / 1000, float(job["usr_cpu"]), float(job["sys_cpu"])


def run(fio: Fio, path: Path, size: int, block: int, depth: int, *, timed: bool = True) -> FioRun:
    """One fio job reading `size` bytes of `path`. `timed`: a runtime too short for fio's
    millisecond clock is an error (the probe's tiny read does not care)."""
    argv = command(fio.path, fio.engine, path, size=size, block=block, depth=depth)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise FioFailed(f"fio exited with {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}")
    read_bytes, runtime, usr, sys_pct = parse_job(_report(done.stdout), depth, block)
    if read_bytes != size:
        raise FioFailed(f"fio read {read_bytes} bytes of {size}")
    if timed and runtime <= 0:
        raise FioFailed("fio reported a zero runtime (file too small for its millisecond clock)")
    child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return FioRun(
        depth=depth,
        block=block,
        bytes=read_bytes,
        runtime_s=runtime,
        cpu_s=(usr + sys_pct) / 100 * runtime,
        usr_pct=usr,
        sys_pct=sys_pct,
        process_cpu_s=child_cpu,
        process_wall_s=wall,
        command=argv,
    )


def probe(path: Path, size: int, engine: str, installed_now: bool) -> Fio:
    """fio's version and an engine that reads this file with O_DIRECT ("auto": io_uring, else
    libaio; io_uring may be disabled by sysctl or a seccomp profile)."""
    fio_path = shutil.which("fio")
    if fio_path is None:
        raise FioMissing(f"fio is not installed: apt-get install -y {FIO_PACKAGE}")
    version = subprocess.run([fio_path, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    failures: list[str] = []
    for candidate in ENGINES if engine == "auto" else (engine,):
        fio = Fio(fio_path, version, candidate, installed_now)
        try:
            probe_bytes = min(size, PROBE_BYTES)
            run(fio, path, probe_bytes, min(probe_bytes, PROBE_BYTES // 4), 4, timed=False)
        except (FioFailed, subprocess.TimeoutExpired) as error:
            failures.append(f"{candidate}: {error}")
            continue
        return fio
    raise FioFailed("no fio engine reads this file with O_DIRECT: " + "; ".join(failures))
