#!/usr/bin/env python3
"""Build dmabufd's Linux 6.12 kernels and run commands inside them under QEMU.

Two variants are built from Debian's ``linux-source-6.12``:

* ``stock``: ``make tinyconfig`` + our config fragment (kernel-patches/dmabufd-6.12.config);
* ``patched``: the same plus the series in kernel-patches/linux-6.12/ (0001-*.patch ...),
  built incrementally from a copy of the built stock tree.

Results live in a cache outside the repository (``$DMABUFD_VM_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/dmabufd-vm``) under a key made of the source package version,
the fragment and (for ``patched``) the patches, so a kernel is rebuilt only when one of them
changes.  ``run`` boots a cached kernel with the host root shared read-only over virtio-9p, a
fresh ext4 scratch disk at /mnt/scratch and a writable results share, runs one command in the
caller's working directory and returns its exit code and output.

Standard library only; importable (``build``, ``run``, ``status``) and a CLI
(``python3 tools/vm/dmabufd_vm.py --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal, TextIO

Variant = Literal["stock", "patched"]
VARIANTS: tuple[Variant, ...] = ("stock", "patched")

# Bump when the build procedure changes in a way that must invalidate cached kernels.
RECIPE_VERSION = "1"
SOURCE_PACKAGE = "linux-source-6.12"
APT_PACKAGES: tuple[str, ...] = (
    "linux-source-6.12",
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "qemu-system-x86",
    "cpio",
    "e2fsprogs",
)
# Selftests built from each variant's tree: (name, directory in the tree, required).
SELFTESTS: tuple[tuple[str, str, bool], ...] = (
    ("dmabuf-heaps", "tools/testing/selftests/dmabuf-heaps", True),
    ("udmabuf", "tools/testing/selftests/drivers/dma-buf", False),
)
DIRECT_IO_SELFTEST = "dmabuf_direct_io"
INIT_MARKER = "DMABUFD_VM_INIT_START"
READY_MARKER = "DMABUFD_VM_READY"
DONE_MARKER = "DMABUFD_VM_DONE"
# Variables of the caller passed into the guest command (plus every DMABUFD_* one).
PASSTHROUGH_ENV: tuple[str, ...] = (
    "PATH",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "LANG",
    "LC_ALL",
    "CI",
    "PYTEST_ADDOPTS",
)
# Always on the guest's kernel command line (run's kernel_args are appended): two vivid
# instances, /dev/video0 single-planar and the next multi-planar, for the camera tests.
DEFAULT_KERNEL_ARGS = "vivid.n_devs=2 vivid.multiplanar=1,2"
GUEST_SCRATCH = "/mnt/scratch"
GUEST_RESULTS = "/mnt/results"


class VMError(RuntimeError):
    """A build or run could not be done; the message says why and what to do."""


class MissingDependenciesError(VMError):
    """Host packages are missing and cannot be installed (not root)."""


# --------------------------------------------------------------------------------------------
# Paths and inputs


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("DMABUFD_VM_CACHE"):
        return Path(env["DMABUFD_VM_CACHE"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "dmabufd-vm"


def default_fragment() -> Path:
    env = os.environ.get("DMABUFD_VM_FRAGMENT")
    return Path(env) if env else repo_root() / "kernel-patches" / "dmabufd-6.12.config"


def default_patch_dir() -> Path:
    env = os.environ.get("DMABUFD_VM_PATCH_DIR")
    return Path(env) if env else repo_root() / "kernel-patches" / "linux-6.12"


def list_patches(patch_dir: Path) -> list[Path]:
    """The series to apply, in order: NNNN-*.patch with NNNN >= 0001 (no cover letter)."""
    if not patch_dir.is_dir():
        return []
    out = []
    for p in sorted(patch_dir.glob("[0-9][0-9][0-9][0-9]-*.patch")):
        if int(p.name[:4]) >= 1:
            out.append(p)
    return out


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything a kernel build depends on."""

    source_version: str
    tarball: Path
    fragment: Path
    patches: tuple[Path, ...]


def source_package_info() -> tuple[str, Path]:
    """(Debian version of linux-source-6.12, path of its tarball)."""
    try:
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        files = subprocess.run(
            ["dpkg-query", "-L", SOURCE_PACKAGE], check=True, capture_output=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise VMError(f"{SOURCE_PACKAGE} is not installed ({e})") from e
    tarballs = [Path(f) for f in files if re.search(r"/linux-source-[^/]*\.tar\.(xz|bz2|gz)$", f)]
    if not version or not tarballs:
        raise VMError(f"{SOURCE_PACKAGE} is installed but its tarball was not found")
    return version, tarballs[0]


def compute_key(
    variant: Variant,
    source_version: str,
    fragment_text: bytes,
    patches: Sequence[tuple[str, bytes]],
) -> str:
    """Cache key of a kernel build: hash of recipe, source version, fragment (and patches)."""
    h = hashlib.sha256()

    def put(label: str, data: bytes) -> None:
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    put("recipe", RECIPE_VERSION.encode())
    put("variant", variant.encode())
    put("source", source_version.encode())
    put("fragment", fragment_text)
    if variant == "patched":
        for name, content in patches:
            put("patch-name", name.encode())
            put("patch", content)
    return h.hexdigest()[:20]


def key_for(variant: Variant, inputs: Inputs) -> str:
    patches = [(p.name, p.read_bytes()) for p in inputs.patches] if variant == "patched" else []
    return compute_key(variant, inputs.source_version, inputs.fragment.read_bytes(), patches)


# --------------------------------------------------------------------------------------------
# Kconfig fragment handling

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Map CONFIG_* -> value; ``n`` for '# CONFIG_X is not set'."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _SET_RE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET_RE.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def verify_fragment(fragment_text: str, config_text: str) -> list[str]:
    """Options of the fragment that did not end up as requested in .config (empty: all good)."""
    want = parse_config(fragment_text)
    have = parse_config(config_text)
    problems = []
    for name, value in want.items():
        got = have.get(name, "n")
        if value == "n":
            if got != "n":
                problems.append(f"{name}: wanted not set, got {got}")
        elif got != value:
            shown = "not set" if got == "n" else got
            problems.append(f"{name}: wanted {value}, got {shown}")
    return problems


# --------------------------------------------------------------------------------------------
# Host dependencies


def missing_packages(packages: Sequence[str] = APT_PACKAGES) -> list[str]:
    if shutil.which("dpkg-query") is None:
        raise VMError("dpkg-query not found: this harness needs a Debian-based host")
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *packages],
        check=False,
        capture_output=True,
        text=True,
    )
    installed = set()
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("ii"):
            installed.add(parts[0])
    return [p for p in packages if p not in installed]


def ensure_dependencies(log: TextIO, packages: Sequence[str] = APT_PACKAGES) -> None:
    """Install missing host packages when root; otherwise say exactly what is missing."""
    missing = missing_packages(packages)
    if not missing:
        return
    if os.geteuid() != 0:
        raise MissingDependenciesError(
            "missing host packages: " + " ".join(missing) + "\n"
            "install them as root: apt-get update && apt-get install -y " + " ".join(packages)
        )
    log.write(f"[dmabufd-vm] installing missing packages: {' '.join(missing)}\n")
    log.flush()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=900"]
    subprocess.run(["apt-get", *lock, "update"], check=True, env=env, stdout=log, stderr=log)
    subprocess.run(
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", *packages],
        check=True,
        env=env,
        stdout=log,
        stderr=log,
    )
    still = missing_packages(packages)
    if still:
        raise VMError(f"apt-get install did not install: {' '.join(still)}")


# --------------------------------------------------------------------------------------------
# Cache layout


@dataclasses.dataclass(frozen=True)
class Cache:
    root: Path

    @property
    def trees(self) -> Path:
        return self.root / "trees"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def tree(self, variant: Variant) -> Path:
        return self.trees / variant

    def artifact(self, variant: Variant, key: str) -> Path:
        return self.artifacts / f"{variant}-{key}"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class Artifact:
    variant: Variant
    key: str
    path: Path

    @property
    def bzimage(self) -> Path:
        return self.path / "bzImage"

    @property
    def selftests(self) -> Path:
        return self.path / "selftests"

    @property
    def info(self) -> dict[str, object]:
        try:
            data = json.loads((self.path / "build.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def complete(self) -> bool:
        return self.bzimage.is_file() and (self.path / "build.json").is_file()


# --------------------------------------------------------------------------------------------
# Building


def _nproc() -> int:
    return len(os.sched_getaffinity(0)) or 1


def _rm_rf(path: Path) -> None:
    """Remove a kernel tree: `rm -rf` is several times faster than shutil.rmtree on ~80k files."""
    subprocess.run(["rm", "-rf", "--", str(path)], check=True)


def _read_state(tree: Path) -> dict[str, str]:
    try:
        data = json.loads((tree / ".dmabufd-vm-state.json").read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_state(tree: Path, state: Mapping[str, str]) -> None:
    (tree / ".dmabufd-vm-state.json").write_text(json.dumps(dict(state), indent=1) + "\n")


class _Builder:
    def __init__(self, cache: Cache, inputs: Inputs, log: TextIO, jobs: int) -> None:
        self.cache = cache
        self.inputs = inputs
        self.log = log
        self.jobs = jobs
        cache.logs.mkdir(parents=True, exist_ok=True)

    def say(self, msg: str) -> None:
        self.log.write(f"[dmabufd-vm] {msg}\n")
        self.log.flush()

    def sh(self, argv: Sequence[str], cwd: Path, logfile: Path, what: str) -> float:
        """Run a build command, output appended to logfile; raise with its tail on failure."""
        t0 = time.monotonic()
        with open(logfile, "a") as lf:
            lf.write(f"\n$ (cd {cwd} && {shlex.join(argv)})\n")
            lf.flush()
            proc = subprocess.run(list(argv), check=False, cwd=cwd, stdout=lf, stderr=subprocess.STDOUT)
        dt = time.monotonic() - t0
        if proc.returncode != 0:
            tail = "".join(logfile.read_text(errors="replace").splitlines(True)[-60:])
            raise VMError(f"{what} failed (exit {proc.returncode}); log {logfile}:\n{tail}")
        return dt

    # -- trees

    def unpack_stock(self, logfile: Path) -> float:
        tree = self.cache.tree("stock")
        state = _read_state(tree)
        if tree.is_dir() and state.get("source_version") == self.inputs.source_version:
            return 0.0
        self.say(f"unpacking {self.inputs.tarball} ...")
        t0 = time.monotonic()
        if tree.exists():
            _rm_rf(tree)
        self.cache.trees.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=self.cache.trees))
        try:
            self.sh(["tar", "-xf", str(self.inputs.tarball), "-C", str(tmp)], tmp, logfile, "unpack")
            tops = [p for p in tmp.iterdir() if p.is_dir()]
            if len(tops) != 1:
                raise VMError(f"unexpected tarball layout: {tops}")
            tops[0].rename(tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _write_state(tree, {"source_version": self.inputs.source_version})
        dt = time.monotonic() - t0
        self.say(f"unpacked in {dt:.0f} s")
        return dt

    def copy_stock_to_patched(self, logfile: Path) -> float:
        src, dst = self.cache.tree("stock"), self.cache.tree("patched")
        t0 = time.monotonic()
        if dst.exists():
            _rm_rf(dst)
        self.sh(["cp", "-a", "--reflink=auto", str(src), str(dst)], self.cache.trees, logfile, "copy of the stock tree")
        for patch in self.inputs.patches:
            self.sh(
                ["patch", "-p1", "--fuzz=0", "--forward", "--batch", "-i", str(patch)],
                dst,
                logfile,
                f"applying {patch.name}",
            )
        dt = time.monotonic() - t0
        self.say(f"patched tree ready ({len(self.inputs.patches)} patches) in {dt:.0f} s")
        return dt

    # -- configure + build

    def configure(self, tree: Path, logfile: Path) -> float:
        t0 = time.monotonic()
        frag = self.inputs.fragment
        self.sh(["make", "tinyconfig"], tree, logfile, "make tinyconfig")
        self.sh(["scripts/kconfig/merge_config.sh", "-m", ".config", str(frag)], tree, logfile, "merge_config.sh")
        self.sh(["make", "olddefconfig"], tree, logfile, "make olddefconfig")
        problems = verify_fragment(frag.read_text(), (tree / ".config").read_text())
        if problems:
            raise VMError(
                f"Kconfig dropped {len(problems)} option(s) of {frag} "
                "(a dependency is missing from the fragment):\n  " + "\n  ".join(problems)
            )
        return time.monotonic() - t0

    def make_kernel(self, tree: Path, logfile: Path) -> float:
        self.say(f"make -j{self.jobs} bzImage in {tree} (log: {logfile}) ...")
        dt = self.sh(["make", f"-j{self.jobs}", "bzImage"], tree, logfile, "kernel build")
        self.say(f"bzImage built in {dt:.0f} s")
        return dt

    def make_selftests(self, tree: Path, out: Path, logfile: Path) -> tuple[float, list[str]]:
        t0 = time.monotonic()
        self.sh(["make", f"-j{self.jobs}", "headers"], tree, logfile, "make headers")
        notes: list[str] = []
        for name, rel, required in SELFTESTS:
            dest = out / name
            dest.mkdir(parents=True, exist_ok=True)
            try:
                self.sh(["make", "-C", rel, f"OUTPUT={dest}"], tree, logfile, f"selftests {rel}")
            except VMError as e:
                if required:
                    raise
                notes.append(f"{name}: did not build ({str(e).splitlines()[0]})")
                self.say(f"warning: selftest {name} did not build; see {logfile}")
            for leftover in dest.glob("*.o"):
                leftover.unlink()
        return time.monotonic() - t0, notes

    def build_tree(self, variant: Variant, key: str, logfile: Path) -> dict[str, float]:
        """Bring the variant's tree to a built state for `key`; return timings."""
        times: dict[str, float] = {}
        tree = self.cache.tree(variant)
        if variant == "stock":
            times["unpack_s"] = self.unpack_stock(logfile)
        else:
            stock_key = key_for("stock", self.inputs)
            if _read_state(self.cache.tree("stock")).get("built_key") != stock_key:
                self.say("the stock tree is not built for the current inputs; building it first")
                build(
                    "stock",
                    cache=self.cache,
                    inputs=self.inputs,
                    log=self.log,
                    jobs=self.jobs,
                    _locked=True,
                    _force_tree=True,
                )
            times["copy_patch_s"] = self.copy_stock_to_patched(logfile)
        state = _read_state(tree)
        state.pop("built_key", None)  # until this build succeeds, the tree is not "built"
        _write_state(tree, state)
        times["configure_s"] = self.configure(tree, logfile)
        times["make_s"] = self.make_kernel(tree, logfile)
        state = _read_state(tree)
        state["built_key"] = key
        _write_state(tree, state)
        return times


def resolve_inputs(fragment: Path | None = None, patch_dir: Path | None = None) -> Inputs:
    version, tarball = source_package_info()
    frag = fragment or default_fragment()
    if not frag.is_file():
        raise VMError(f"config fragment not found: {frag}")
    return Inputs(
        source_version=version,
        tarball=tarball,
        fragment=frag,
        patches=tuple(list_patches(patch_dir or default_patch_dir())),
    )


def cached_artifact(variant: Variant, cache: Cache, inputs: Inputs) -> Artifact | None:
    if variant == "patched" and not inputs.patches:
        return None
    key = key_for(variant, inputs)
    art = Artifact(variant, key, cache.artifact(variant, key))
    return art if art.complete() else None


def build(
    variant: Variant,
    *,
    cache: Cache | None = None,
    inputs: Inputs | None = None,
    log: TextIO | None = None,
    jobs: int | None = None,
    install: bool = True,
    _locked: bool = False,
    _force_tree: bool = False,
) -> Artifact:
    """Make sure the variant's kernel (and selftests) for the current inputs are cached."""
    log = log or sys.stderr
    cache = cache or Cache(default_cache_dir())
    if install:
        ensure_dependencies(log)
    inputs = inputs or resolve_inputs()
    if variant == "patched" and not inputs.patches:
        raise VMError(
            f"no patches found (expected {default_patch_dir()}/0001-*.patch ...): "
            "the patched kernel cannot be built yet"
        )
    key = key_for(variant, inputs)
    art = Artifact(variant, key, cache.artifact(variant, key))
    if art.complete() and not _force_tree:
        log.write(f"[dmabufd-vm] {variant} kernel cached: {art.path}\n")
        return art
    with contextlib.ExitStack() as stack:
        if not _locked:
            stack.enter_context(cache.lock())
            if art.complete() and not _force_tree:  # built meanwhile by another process
                return art
        builder = _Builder(cache, inputs, log, jobs or _nproc())
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        logfile = cache.logs / f"build-{variant}-{key}-{stamp}.log"
        builder.say(f"building the {variant} kernel (key {key}), log {logfile}")
        t0 = time.monotonic()
        times = builder.build_tree(variant, key, logfile)
        tree = cache.tree(variant)
        staging = Path(tempfile.mkdtemp(prefix=f"{variant}-{key}-", dir=cache.root))
        try:
            shutil.copy2(tree / "arch/x86/boot/bzImage", staging / "bzImage")
            shutil.copy2(tree / ".config", staging / "config")
            st_s, notes = builder.make_selftests(tree, staging / "selftests", logfile)
            times["selftests_s"] = st_s
            times["total_s"] = time.monotonic() - t0
            info: dict[str, object] = {
                "variant": variant,
                "key": key,
                "source_version": inputs.source_version,
                "fragment": str(inputs.fragment),
                "patches": [p.name for p in inputs.patches] if variant == "patched" else [],
                "built_at": _dt.datetime.now().isoformat(timespec="seconds"),
                "jobs": jobs or _nproc(),
                "times": {k: round(v, 1) for k, v in times.items()},
                "notes": notes,
                "log": str(logfile),
            }
            (staging / "build.json").write_text(json.dumps(info, indent=1) + "\n")
            cache.artifacts.mkdir(parents=True, exist_ok=True)
            if art.path.exists():
                shutil.rmtree(art.path)
            staging.rename(art.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with open(cache.logs / "build-times.log", "a") as fh:
            fh.write(json.dumps(info) + "\n")
        builder.say(
            f"{variant} kernel built in {times['total_s']:.0f} s "
            f"({', '.join(f'{k}={v:.0f}' for k, v in times.items())}) -> {art.path}"
        )
    return art


# --------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class RunResult:
    returncode: int
    output: str
    console_log: Path
    boot_seconds: float | None  # host time from QEMU start to the guest init's first line
    ready_seconds: float | None  # ... to the guest having mounted everything
    wall_seconds: float
    timed_out: bool
    variant: Variant
    key: str
    accel: str

    def summary(self) -> str:
        boot = f"{self.boot_seconds:.1f}" if self.boot_seconds is not None else "?"
        ready = f"{self.ready_seconds:.1f}" if self.ready_seconds is not None else "?"
        return (
            f"{self.variant} kernel ({self.key}, {self.accel}): exit {self.returncode}"
            f"{' (TIMEOUT)' if self.timed_out else ''}; init started after {boot} s, "
            f"ready after {ready} s, total {self.wall_seconds:.1f} s; console {self.console_log}"
        )


def guest_env(
    variant: Variant,
    art: Artifact,
    patched_art: Artifact | None,
    extra: Mapping[str, str],
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for k, v in env.items():
        if k in PASSTHROUGH_ENV or k.startswith("DMABUFD_"):
            out[k] = v
    # The caller's Python first (its venv lives on the host root, visible in the guest).
    path = [str(Path(sys.executable).parent)]
    for d in [*out.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"), "/usr/sbin", "/sbin"]:
        if d and d not in path:
            path.append(d)
    out["PATH"] = ":".join(path)
    out.pop("DMABUFD_VM_CACHE", None)
    out.update(
        HOME="/tmp/home",
        TMPDIR="/tmp",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        DMABUFD_IN_VM="1",
        DMABUFD_VM_VARIANT=variant,
        DMABUFD_VM_KEY=art.key,
        DMABUFD_VM_SCRATCH=GUEST_SCRATCH,
        DMABUFD_VM_RESULTS=GUEST_RESULTS,
        DMABUFD_VM_PYTHON=sys.executable,
        DMABUFD_VM_SELFTESTS=str(art.selftests),
    )
    if patched_art is not None:
        out["DMABUFD_VM_PATCHED_SELFTESTS"] = str(patched_art.selftests)
    out.update(extra)
    return out


def render_init(cmd: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The guest's /sbin/init for one run (a POSIX sh script, run as PID 1)."""
    q = shlex.quote
    env_args = " ".join(q(f"{k}={v}") for k, v in sorted(env.items()))
    py = q(env.get("DMABUFD_VM_PYTHON", sys.executable))
    return f"""#!/bin/sh
# Generated by tools/vm/dmabufd_vm.py: the guest's init for one command.
echo "{INIT_MARKER}"
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /tmp/home
mount -t tmpfs -o mode=755 tmpfs /mnt
mkdir -p {GUEST_SCRATCH} {GUEST_RESULTS}
setup=ok
# The working directory comes on a share of its own, mounted at its host
# path: a checkout under /tmp or /run would otherwise be hidden by the tmpfs.
mkdir -p {q(str(cwd))}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro workdir {q(str(cwd))} || setup=workdir
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results {GUEST_RESULTS} || setup=results
mount -t ext4 -o noatime /dev/vda {GUEST_SCRATCH} || setup=scratch
chmod 1777 {GUEST_SCRATCH}
echo "{READY_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime) setup=$setup"
if [ "$setup" = ok ]; then
    cd {q(str(cwd))} || cd /
    {{ env -i {env_args} {shlex.join(cmd)} < /dev/null; echo $? > {GUEST_RESULTS}/rc; }} 2>&1 \\
        | tee {GUEST_RESULTS}/output
else
    echo "guest setup failed: $setup" | tee {GUEST_RESULTS}/output
    echo 125 > {GUEST_RESULTS}/rc
fi
echo "{DONE_MARKER} rc=$(cat {GUEST_RESULTS}/rc 2>/dev/null) uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /
sync
umount {GUEST_SCRATCH} 2>/dev/null
umount {GUEST_RESULTS} 2>/dev/null
# Reboot (QEMU runs with -no-reboot, so it exits); if that fails, exiting panics (panic=-1).
{py} -c 'import ctypes; ctypes.CDLL(None).reboot(0x01234567)' 2>/dev/null
exit 0
"""


GUEST_MOUNTS = ("/tmp", "/run", "/mnt", "/dev", "/proc", "/sys")


def _hidden_in_guest(path: Path) -> str | None:
    """The guest mount point that would hide `path` (only the working directory is re-shared)."""
    for mount in GUEST_MOUNTS:
        if path == Path(mount) or Path(mount) in path.parents:
            return mount
    return None


def _make_scratch(path: Path, size_mb: int, log: TextIO) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size_mb * 1024 * 1024)
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    proc = subprocess.run(
        [mkfs, "-q", "-F", "-L", "dmabufd-scratch", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise VMError(f"mkfs.ext4 failed: {proc.stderr.strip()}")


def _supports_odirect(directory: Path) -> bool:
    probe = directory / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_RDWR | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_command(
    bzimage: Path,
    init: Path,
    results: Path,
    scratch: Path,
    *,
    workdir: Path,
    mem: str,
    smp: int,
    accel: str,
    cache_mode: str,
    kernel_args: str = "",
) -> list[str]:
    append = " ".join(
        [
            "console=ttyS0",
            "root=hostroot",
            "rootfstype=9p",
            "rootflags=trans=virtio,version=9p2000.L,msize=512000,cache=loose",
            "ro",
            f"init={init}",
            "panic=-1",
            "quiet",
            DEFAULT_KERNEL_ARGS,
            kernel_args,
        ]
    ).strip()
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    argv = [
        qemu,
        "-nographic",
        "-no-reboot",
        "-m",
        mem,
        "-smp",
        str(smp),
        "-cpu",
        "max" if accel == "tcg" else "host",
        "-accel",
        accel,
        "-kernel",
        str(bzimage),
        "-append",
        append,
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev",
        f"local,id=workdir,path={workdir},security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=workdir,mount_tag=workdir",
        "-fsdev",
        f"local,id=results,path={results},security_model=none",
        "-device",
        "virtio-9p-pci,fsdev=results,mount_tag=results",
        "-drive",
        f"file={scratch},if=virtio,format=raw,cache={cache_mode}",
        "-nic",
        "none",
    ]
    return argv


def run(
    variant: Variant,
    cmd: Sequence[str],
    *,
    cache: Cache | None = None,
    inputs: Inputs | None = None,
    mem: str = "2G",
    smp: int = 2,
    disk_mb: int = 1024,
    timeout: float = 900.0,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    console: TextIO | None = None,
    console_log: Path | None = None,
    build_if_missing: bool = True,
    accel: str | None = None,
    keep: bool = False,
    kernel_args: str = "",
) -> RunResult:
    """Boot the variant's cached kernel, run `cmd` inside, return its exit code and output."""
    cache = cache or Cache(default_cache_dir())
    log = console if console is not None else sys.stderr
    if shutil.which("qemu-system-x86_64") is None:
        raise MissingDependenciesError("qemu-system-x86_64 not found (Debian package qemu-system-x86)")
    inputs = inputs or resolve_inputs()
    art = cached_artifact(variant, cache, inputs)
    if art is None:
        if not build_if_missing:
            raise VMError(f"no cached {variant} kernel for the current inputs; run `build` first")
        art = build(variant, cache=cache, inputs=inputs, log=log)
    patched_art = art if variant == "patched" else cached_artifact("patched", cache, inputs)
    if accel is None:
        accel = os.environ.get("DMABUFD_VM_ACCEL", "tcg")
    if accel == "auto":
        accel = "kvm" if _kvm_usable() else "tcg"

    hidden = _hidden_in_guest(cache.root.resolve())
    if hidden:
        raise VMError(
            f"the cache {cache.root} is under {hidden}, which the guest mounts a tmpfs over: "
            "the kernel's selftests and the init script would be invisible there; "
            "set DMABUFD_VM_CACHE (or --cache) to a directory elsewhere"
        )
    cache.runs.mkdir(parents=True, exist_ok=True)
    cache.logs.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix=f"run-{variant}-", dir=cache.runs))
    results = rundir / "results"
    results.mkdir()
    os.chmod(rundir, 0o755)
    os.chmod(results, 0o777)
    scratch = rundir / "scratch.img"
    _make_scratch(scratch, disk_mb, log)
    init = rundir / "init.sh"
    workdir = (cwd or Path.cwd()).resolve()
    init.write_text(render_init(cmd, workdir, guest_env(variant, art, patched_art, env or {})))
    init.chmod(0o755)
    console_path = console_log or cache.logs / f"console-{rundir.name}.log"
    argv = qemu_command(
        art.bzimage,
        init,
        results,
        scratch,
        workdir=workdir,
        mem=mem,
        smp=smp,
        accel=accel,
        cache_mode="none" if _supports_odirect(rundir) else "writeback",
        kernel_args=kernel_args,
    )
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    timed_out = False
    with open(console_path, "w") as clog:
        clog.write(f"# {shlex.join(argv)}\n")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump_console, args=(proc.stdout, clog, console, marks, t0), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    wall = time.monotonic() - t0
    rc_file, out_file = results / "rc", results / "output"
    output = out_file.read_text(errors="replace") if out_file.exists() else ""
    try:
        rc = int(rc_file.read_text().strip())
    except (OSError, ValueError):
        rc = 124 if timed_out else 255
        tail = "".join(console_path.read_text(errors="replace").splitlines(True)[-40:])
        why = f"timeout after {timeout:.0f} s" if timed_out else f"qemu exited {proc.returncode}"
        output += f"\n[dmabufd-vm] the guest did not report an exit code ({why}); console tail:\n{tail}"
    result = RunResult(
        returncode=rc,
        output=output,
        console_log=console_path,
        boot_seconds=marks.get(INIT_MARKER),
        ready_seconds=marks.get(READY_MARKER),
        wall_seconds=wall,
        timed_out=timed_out,
        variant=variant,
        key=art.key,
        accel=accel,
    )
    if not keep:
        shutil.rmtree(rundir, ignore_errors=True)
    log.write(f"[dmabufd-vm] {result.summary()}\n")
    log.flush()
    return result


def _pump_console(stream: IO[bytes], clog: TextIO, console: TextIO | None, marks: dict[str, float], t0: float) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        for marker in (INIT_MARKER, READY_MARKER, DONE_MARKER):
            if marker in line and marker not in marks:
                marks[marker] = time.monotonic() - t0
        clog.write(line)
        clog.flush()
        if console is not None:
            console.write(line)
            console.flush()


# --------------------------------------------------------------------------------------------
# Status


def status(cache: Cache | None = None, inputs: Inputs | None = None) -> str:
    cache = cache or Cache(default_cache_dir())
    lines = [f"cache: {cache.root}"]
    current: dict[str, str] = {}
    try:
        inputs = inputs or resolve_inputs()
        lines.append(f"source: {SOURCE_PACKAGE} {inputs.source_version} ({inputs.tarball})")
        lines.append(f"fragment: {inputs.fragment}")
        lines.append(f"patches: {len(inputs.patches)} in {default_patch_dir()}")
        for v in VARIANTS:
            if v == "patched" and not inputs.patches:
                lines.append("current patched key: - (no patches yet)")
                continue
            current[v] = key_for(v, inputs)
            lines.append(f"current {v} key: {current[v]}")
    except VMError as e:
        lines.append(f"inputs: unavailable ({e})")
    arts = sorted(cache.artifacts.glob("*-*")) if cache.artifacts.is_dir() else []
    if not arts:
        lines.append("no kernels cached")
    for path in arts:
        variant_s, _, key = path.name.partition("-")
        if variant_s not in VARIANTS:
            continue
        art = Artifact("stock" if variant_s == "stock" else "patched", key, path)
        info = art.info
        mark = "current" if current.get(variant_s) == key else "stale"
        times = info.get("times", {})
        total = times.get("total_s") if isinstance(times, dict) else None
        tests = sorted(p.name for p in art.selftests.glob("*/*") if p.is_file())
        lines.append(
            f"  {path.name}: {mark}, {'complete' if art.complete() else 'INCOMPLETE'}, "
            f"built {info.get('built_at', '?')} in {total} s, selftests: {', '.join(tests) or '-'}"
        )
    for v in VARIANTS:
        st = _read_state(cache.tree(v))
        if st:
            lines.append(f"tree {v}: {cache.tree(v)} built_key={st.get('built_key', '-')}")
    return "\n".join(lines)


def prune(cache: Cache, inputs: Inputs) -> list[Path]:
    """Remove cached kernels whose key is not current, and leftover run dirs."""
    current = {cache.artifact(v, key_for(v, inputs)) for v in VARIANTS if v == "stock" or inputs.patches}
    removed: list[Path] = []
    with cache.lock():
        for path in sorted(cache.artifacts.glob("*")) if cache.artifacts.is_dir() else []:
            if path not in current:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        for path in sorted(cache.runs.glob("run-*")) if cache.runs.is_dir() else []:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dmabufd_vm", description=__doc__.splitlines()[0])
    p.add_argument(
        "--cache", type=Path, help="cache dir (default: $DMABUFD_VM_CACHE or ${XDG_CACHE_HOME:-~/.cache}/dmabufd-vm)"
    )
    p.add_argument("--fragment", type=Path, help="Kconfig fragment (default: kernel-patches/dmabufd-6.12.config)")
    p.add_argument("--patch-dir", type=Path, help="patch series dir (default: kernel-patches/linux-6.12)")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find cached) kernels")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--variant", choices=VARIANTS)
    g.add_argument("--all", action="store_true", help="stock, then patched if patches exist")
    b.add_argument("-j", "--jobs", type=int, help="make -j (default: nproc)")
    b.add_argument("--no-install", action="store_true", help="never run apt-get")
    r = sub.add_parser("run", help="boot a kernel and run a command inside")
    r.add_argument("--variant", choices=VARIANTS, required=True)
    r.add_argument("--mem", default="2G")
    r.add_argument("--smp", type=int, default=2)
    r.add_argument("--disk-mb", type=int, default=1024)
    r.add_argument("--timeout", type=float, default=900.0)
    r.add_argument("--accel", choices=("tcg", "kvm", "auto"), help="default tcg (or $DMABUFD_VM_ACCEL)")
    r.add_argument("--env", action="append", default=[], metavar="K=V")
    r.add_argument("--console-log", type=Path, help="write the guest console here")
    r.add_argument("--quiet", action="store_true", help="do not stream the console to stderr")
    r.add_argument("--no-build", action="store_true", help="fail if the kernel is not cached")
    r.add_argument("--keep", action="store_true", help="keep the run dir (init, disk image)")
    r.add_argument("--kernel-args", default="", help="extra kernel command line")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("status", help="what is cached")
    sub.add_parser("prune", help="remove cached kernels that are not current, and old run dirs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    cache = Cache(args.cache or default_cache_dir())
    try:
        if args.command == "status":
            try:
                inputs: Inputs | None = resolve_inputs(args.fragment, args.patch_dir)
            except VMError:
                inputs = None
            print(status(cache, inputs))
            return 0
        if args.command == "prune":
            for path in prune(cache, resolve_inputs(args.fragment, args.patch_dir)):
                print(f"removed {path}")
            return 0
        if args.command == "build":
            if not args.no_install:
                ensure_dependencies(sys.stderr)
            inputs = resolve_inputs(args.fragment, args.patch_dir)
            variants: list[Variant] = [args.variant] if args.variant else ["stock"]
            if args.all:
                if inputs.patches:
                    variants.append("patched")
                else:
                    print("[dmabufd-vm] no patches yet: building stock only", file=sys.stderr)
            for v in variants:
                art = build(v, cache=cache, inputs=inputs, jobs=args.jobs, install=False)
                print(f"{v}: {art.path} {json.dumps(art.info.get('times', {}))}")
            return 0
        cmd = list(args.cmd)
        if cmd and cmd[0] == "--":
            cmd = cmd[1:]
        if not cmd:
            print("run: no command given (use: run --variant stock -- CMD ...)", file=sys.stderr)
            return 2
        extra = dict(kv.split("=", 1) for kv in args.env)
        inputs = resolve_inputs(args.fragment, args.patch_dir)
        result = run(
            args.variant,
            cmd,
            cache=cache,
            inputs=inputs,
            mem=args.mem,
            smp=args.smp,
            disk_mb=args.disk_mb,
            timeout=args.timeout,
            env=extra,
            console=None if args.quiet else sys.stderr,
            console_log=args.console_log,
            build_if_missing=not args.no_build,
            accel=args.accel,
            keep=args.keep,
            kernel_args=args.kernel_args,
        )
        if args.quiet:
            sys.stdout.write(result.output)
        print(result.summary(), file=sys.stderr)
        return result.returncode
    except VMError as e:
        print(f"dmabufd-vm: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
