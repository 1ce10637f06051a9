#!/usr/bin/env python3
"""Build dmabufd's Linux 6.12 kernels and run commands inside them under QEMU.

A kernel is a *variant* of Debian's ``linux-source-6.12``: ``make tinyconfig`` + the product's
config fragment (kernel-patches/dmabufd-6.12.config) + the variant's extra fragments, with or
without the series in kernel-patches/linux-6.12/ (0001-*.patch ...). Built in:

* ``stock``: no series, no extra fragment;
* ``patched``: the series;
* ``debug``: the series + kernel-patches/dmabufd-6.12-debug.config (lockdep, KASAN).

Custom variants are made with ``build --name NAME [--extra-fragment FILE ...] [--fragment FILE]
[--patch-dir DIR | --no-patches]`` and remembered in the cache.

Results live in a cache outside the repository (``$DMABUFD_VM_CACHE``, else
``${XDG_CACHE_HOME:-~/.cache}/dmabufd-vm``). Each variant has its own tree (trees/<name>), key
and artifact (artifacts/<name>-<key>); the key hashes the recipe, the variant's name, the source
version, its fragments' bytes and, when it applies the series, the patches, so building one
variant never changes another's key or tree. ``stock`` is unpacked and built in place; every
other variant starts from a copy of the built stock tree (whose objects make its build
incremental) and never writes to the stock tree.

``run`` boots a cached variant (or a given bzImage) with the host root shared read-only over
virtio-9p, a fresh ext4 scratch disk at /mnt/scratch (and any other disks asked for), a
writable results share, runs one command in the caller's working directory and returns its exit
code, its output, the guest's dmesg and the kernel reports (lockdep, KASAN, WARNING, BUG ...)
found in it.

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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Literal, TextIO

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
    "f2fs-tools",
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
# acpi=noirq: PCI interrupts routed from the MP table, as before the fragment had ACPI (which it
# has for the CPUs): ACPI routing evaluates QEMU's _PRT method for every device, about 1 s each
# under TCG and over 10 s on the debug kernel, whose boot took ~170 s and hit ACPI's 30 s
# loop timeout (AE_AML_LOOP_TIMEOUT); with it the debug kernel boots in ~12 s.
# log_buf_len=4M (tinyconfig's log is 128 KiB): a debug kernel's reports are not overwritten
# before the guest saves dmesg. printk.devkmsg=on: the guest tests' /dev/kmsg markers are not
# rate-limited away. RCU's stall checks at 120 s instead of 21 s: an emulated guest on a busy
# 2-core host can be that slow without being stuck (a 60 s boot stall tripped the 21 s check).
BOOT_KERNEL_ARGS = "acpi=noirq log_buf_len=4M printk.devkmsg=on rcupdate.rcu_cpu_stall_timeout=120"
# A guest whose init has not started this long after QEMU did is stuck in early boot (a debug
# kernel under TCG reaches init in 12-17 s on this 2-core host, the others sooner): it is killed
# and booted again, up to BOOT_ATTEMPTS boots in all, instead of waiting out the whole run's
# timeout (an hour for the debug suite; CI has 90 minutes).
BOOT_TIMEOUT_S = 240.0
BOOT_ATTEMPTS = 2
STALLED_REPORT_LINES = 400
# Kernel code of ours, or that our series touches: a report that names it is never shrugged off
# as an early-boot flake.
OUR_KERNEL_CODE = re.compile(r"dma_buf|dma_heap|dmabuf|udmabuf|system_heap")
GUEST_SCRATCH = "/mnt/scratch"
GUEST_RESULTS = "/mnt/results"
SCRATCH_NAME = "scratch"


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
    return repo_root() / "kernel-patches" / "dmabufd-6.12.config"


def debug_fragment() -> Path:
    return repo_root() / "kernel-patches" / "dmabufd-6.12-debug.config"


def default_patch_dir() -> Path:
    return repo_root() / "kernel-patches" / "linux-6.12"


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
    """The product's defaults every variant starts from: source, base fragment, series."""

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


def resolve_inputs() -> Inputs:
    version, tarball = source_package_info()
    frag = default_fragment()
    if not frag.is_file():
        raise VMError(f"config fragment not found: {frag}")
    return Inputs(
        source_version=version,
        tarball=tarball,
        fragment=frag,
        patches=tuple(list_patches(default_patch_dir())),
    )


# --------------------------------------------------------------------------------------------
# Variants

# Names become directory names and the artifact's "<name>-<key>" (split at the last "-").
_VARIANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel to build: the base fragment, maybe the series, then extra fragments in order."""

    name: str
    patched: bool
    extra_fragments: tuple[Path, ...] = ()
    # None: the product's fragment and series (Inputs); custom variants may replace them.
    fragment: Path | None = None
    patch_dir: Path | None = None
    # Boot options this kernel wants on every run (not part of the key: they change no object).
    kernel_args: str = ""
    # How many times slower than the product kernel the guest runs (the guest tests scale their
    # waits by it, as DMABUFD_VM_TIMEOUT_SCALE); not part of the key either.
    timeout_scale: float = 1.0
    description: str = ""

    def __post_init__(self) -> None:
        if not _VARIANT_NAME_RE.match(self.name):
            raise VMError(f"bad variant name {self.name!r} (letters, digits, '_', '.', '-'; at most 64)")

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_VARIANTS

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "patched": self.patched,
            "extra_fragments": [str(p) for p in self.extra_fragments],
            "fragment": str(self.fragment) if self.fragment else None,
            "patch_dir": str(self.patch_dir) if self.patch_dir else None,
            "kernel_args": self.kernel_args,
            "timeout_scale": self.timeout_scale,
            "description": self.description,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Variant:
        extras = data.get("extra_fragments", [])
        if not isinstance(extras, list):
            raise VMError(f"bad variant definition: {data}")

        def opt_path(key: str) -> Path | None:
            value = data.get(key)
            return Path(str(value)) if value else None

        return cls(
            name=str(data["name"]),
            patched=bool(data.get("patched", True)),
            extra_fragments=tuple(Path(str(p)) for p in extras),
            fragment=opt_path("fragment"),
            patch_dir=opt_path("patch_dir"),
            kernel_args=str(data.get("kernel_args", "")),
            timeout_scale=_as_float(data.get("timeout_scale"), 1.0),
            description=str(data.get("description", "")),
        )


def _as_float(value: object, default: float) -> float:
    try:
        return float(str(value)) if value is not None else default
    except ValueError:
        return default


BUILTIN_VARIANTS: dict[str, Variant] = {
    "stock": Variant("stock", patched=False, description="the product's config, no series"),
    "patched": Variant("patched", patched=True, description="the product's config and the series"),
    "debug": Variant(
        "debug",
        patched=True,
        extra_fragments=(debug_fragment(),),
        # KASAN reports only its first bug per boot without it; each test should see its own.
        kernel_args="kasan_multi_shot",
        # Measured: importing grpc and the daemon takes ~40 s in this guest against ~13 s on the
        # product kernel (both under TCG); 6 leaves room for a busy host.
        timeout_scale=6.0,
        description="patched + lockdep and KASAN (kernel-patches/dmabufd-6.12-debug.config)",
    ),
}
VARIANTS: tuple[str, ...] = tuple(BUILTIN_VARIANTS)


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """A variant resolved against the inputs: the exact files its build (and key) reads."""

    variant: Variant
    source_version: str
    tarball: Path
    fragments: tuple[Path, ...]  # the base fragment first, then the variant's extra ones
    patches: tuple[Path, ...]  # empty for a variant without the series

    def key(self) -> str:
        return compute_key(
            self.variant.name,
            self.source_version,
            self.fragments[0].read_bytes(),
            [(p.name, p.read_bytes()) for p in self.patches],
            [f.read_bytes() for f in self.fragments[1:]],
        )

    def fragment_text(self) -> str:
        """The fragments as merge_config.sh applies them (a later setting wins)."""
        return "\n".join(f.read_text() for f in self.fragments)


def spec_for(variant: Variant, inputs: Inputs) -> BuildSpec:
    base = variant.fragment or inputs.fragment
    for frag in (base, *variant.extra_fragments):
        if not frag.is_file():
            raise VMError(f"{variant.name}: config fragment not found: {frag}")
    patches: tuple[Path, ...] = ()
    if variant.patched:
        patches = tuple(list_patches(variant.patch_dir)) if variant.patch_dir else inputs.patches
    return BuildSpec(variant, inputs.source_version, inputs.tarball, (base, *variant.extra_fragments), patches)


def compute_key(
    name: str,
    source_version: str,
    fragment_text: bytes,
    patches: Sequence[tuple[str, bytes]],
    extra_fragments: Sequence[bytes] = (),
) -> str:
    """Cache key of a kernel build: hash of recipe, name, source, fragments (and patches)."""
    h = hashlib.sha256()

    def put(label: str, data: bytes) -> None:
        h.update(f"{label}:{len(data)}:".encode())
        h.update(data)

    put("recipe", RECIPE_VERSION.encode())
    put("variant", name.encode())
    put("source", source_version.encode())
    put("fragment", fragment_text)
    for patch_name, content in patches:
        put("patch-name", patch_name.encode())
        put("patch", content)
    # Only present when there are extras, so stock's and patched's keys are what they were
    # before variants existed (their cached kernels stay valid).
    for content in extra_fragments:
        put("extra-fragment", content)
    return h.hexdigest()[:20]


def key_for(variant: Variant, inputs: Inputs) -> str:
    return spec_for(variant, inputs).key()


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

    @property
    def variants(self) -> Path:
        """Definitions of custom variants (so `run --variant NAME` can find their key)."""
        return self.root / "variants"

    @property
    def keep(self) -> Path:
        """Kernels copied aside by hand (e.g. keep/debug-v1); never pruned."""
        return self.root / "keep"

    def tree(self, name: str) -> Path:
        return self.trees / name

    def artifact(self, name: str, key: str) -> Path:
        return self.artifacts / f"{name}-{key}"

    def custom_variants(self) -> dict[str, Variant]:
        out: dict[str, Variant] = {}
        for path in sorted(self.variants.glob("*.json")) if self.variants.is_dir() else []:
            try:
                data = json.loads(path.read_text())
                variant = Variant.from_json(data)
            except (OSError, ValueError, KeyError, VMError):
                continue
            if not variant.builtin:
                out[variant.name] = variant
        return out

    def save_variant(self, variant: Variant) -> None:
        self.variants.mkdir(parents=True, exist_ok=True)
        tmp = self.variants / f".{variant.name}.json.tmp"
        tmp.write_text(json.dumps(variant.to_json(), indent=1) + "\n")
        tmp.rename(self.variants / f"{variant.name}.json")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def get_variant(name: str, cache: Cache | None = None) -> Variant:
    """A built-in variant, or a custom one built before into this cache."""
    if name in BUILTIN_VARIANTS:
        return BUILTIN_VARIANTS[name]
    cache = cache or Cache(default_cache_dir())
    custom = cache.custom_variants()
    if name in custom:
        return custom[name]
    known = ", ".join([*BUILTIN_VARIANTS, *custom])
    raise VMError(f"unknown variant {name!r} (known: {known}); make one with `build --name {name} ...`")


@dataclasses.dataclass(frozen=True)
class Artifact:
    variant: str
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
        return _read_build_json(self.path)

    def complete(self) -> bool:
        return self.bzimage.is_file() and (self.path / "build.json").is_file()


def _read_build_json(directory: Path) -> dict[str, object]:
    try:
        data = json.loads((directory / "build.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
    def __init__(self, cache: Cache, inputs: Inputs, spec: BuildSpec, log: TextIO, jobs: int) -> None:
        self.cache = cache
        self.inputs = inputs
        self.spec = spec
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

    def copy_from_stock(self, logfile: Path) -> float:
        """The variant's tree: a copy of the built stock tree (objects included), then the series."""
        name = self.spec.variant.name
        src, dst = self.cache.tree("stock"), self.cache.tree(name)
        t0 = time.monotonic()
        if dst.exists():
            _rm_rf(dst)
        self.sh(["cp", "-a", "--reflink=auto", str(src), str(dst)], self.cache.trees, logfile, "copy of the stock tree")
        for patch in self.spec.patches:
            self.sh(
                ["patch", "-p1", "--fuzz=0", "--forward", "--batch", "-i", str(patch)],
                dst,
                logfile,
                f"applying {patch.name}",
            )
        dt = time.monotonic() - t0
        self.say(f"{name} tree ready (copy of stock + {len(self.spec.patches)} patches) in {dt:.0f} s")
        return dt

    # -- configure + build

    def configure(self, tree: Path, logfile: Path) -> float:
        t0 = time.monotonic()
        frags = [str(f) for f in self.spec.fragments]
        self.sh(["make", "tinyconfig"], tree, logfile, "make tinyconfig")
        self.sh(["scripts/kconfig/merge_config.sh", "-m", ".config", *frags], tree, logfile, "merge_config.sh")
        self.sh(["make", "olddefconfig"], tree, logfile, "make olddefconfig")
        problems = verify_fragment(self.spec.fragment_text(), (tree / ".config").read_text())
        if problems:
            raise VMError(
                f"Kconfig dropped {len(problems)} option(s) of {', '.join(frags)} "
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

    def build_tree(self, key: str, logfile: Path) -> dict[str, float]:
        """Bring the variant's tree to a built state for `key`; return timings."""
        times: dict[str, float] = {}
        name = self.spec.variant.name
        tree = self.cache.tree(name)
        if name == "stock":
            times["unpack_s"] = self.unpack_stock(logfile)
        else:
            stock_key = key_for(BUILTIN_VARIANTS["stock"], self.inputs)
            if _read_state(self.cache.tree("stock")).get("built_key") != stock_key:
                self.say("the stock tree is not built for the current inputs; building it first")
                build(
                    "stock",
                    cache=self.cache,
                    inputs=self.inputs,
                    log=self.log,
                    jobs=self.jobs,
                    install=False,
                    _locked=True,
                    _force_tree=True,
                )
            times["copy_patch_s"] = self.copy_from_stock(logfile)
        state = _read_state(tree)
        state.pop("built_key", None)  # until this build succeeds, the tree is not "built"
        _write_state(tree, state)
        times["configure_s"] = self.configure(tree, logfile)
        times["make_s"] = self.make_kernel(tree, logfile)
        state = _read_state(tree)
        state["built_key"] = key
        state["variant"] = name
        _write_state(tree, state)
        return times


def _as_variant(variant: str | Variant, cache: Cache) -> Variant:
    return variant if isinstance(variant, Variant) else get_variant(variant, cache)


def cached_artifact(variant: str | Variant, cache: Cache, inputs: Inputs) -> Artifact | None:
    v = _as_variant(variant, cache)
    spec = spec_for(v, inputs)
    if v.patched and not spec.patches:
        return None
    key = spec.key()
    art = Artifact(v.name, key, cache.artifact(v.name, key))
    return art if art.complete() else None


def build(
    variant: str | Variant,
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
    v = _as_variant(variant, cache)
    spec = spec_for(v, inputs)
    if v.patched and not spec.patches:
        raise VMError(
            f"no patches found (expected {v.patch_dir or default_patch_dir()}/0001-*.patch ...): "
            f"the {v.name} kernel cannot be built yet"
        )
    if not v.builtin:
        cache.save_variant(v)
    key = spec.key()
    art = Artifact(v.name, key, cache.artifact(v.name, key))
    if art.complete() and not _force_tree:
        log.write(f"[dmabufd-vm] {v.name} kernel cached: {art.path}\n")
        return art
    with contextlib.ExitStack() as stack:
        if not _locked:
            stack.enter_context(cache.lock())
            if art.complete() and not _force_tree:  # built meanwhile by another process
                return art
        builder = _Builder(cache, inputs, spec, log, jobs or _nproc())
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        logfile = cache.logs / f"build-{v.name}-{key}-{stamp}.log"
        builder.say(f"building the {v.name} kernel (key {key}), log {logfile}")
        t0 = time.monotonic()
        times = builder.build_tree(key, logfile)
        tree = cache.tree(v.name)
        staging = Path(tempfile.mkdtemp(prefix=f"{v.name}-{key}-", dir=cache.root))
        try:
            shutil.copy2(tree / "arch/x86/boot/bzImage", staging / "bzImage")
            shutil.copy2(tree / ".config", staging / "config")
            st_s, notes = builder.make_selftests(tree, staging / "selftests", logfile)
            times["selftests_s"] = st_s
            times["total_s"] = time.monotonic() - t0
            info: dict[str, object] = {
                "variant": v.name,
                "key": key,
                "patched": v.patched,
                "kernel_args": v.kernel_args,
                "timeout_scale": v.timeout_scale,
                "source_version": inputs.source_version,
                "fragment": str(spec.fragments[0]),
                "extra_fragments": [str(f) for f in spec.fragments[1:]],
                "patches": [p.name for p in spec.patches],
                "patch_dir": str(spec.patches[0].parent) if spec.patches else None,
                "built_at": _dt.datetime.now().isoformat(timespec="seconds"),
                "jobs": jobs or _nproc(),
                "times": {k: round(t, 1) for k, t in times.items()},
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
            f"{v.name} kernel built in {times['total_s']:.0f} s "
            f"({', '.join(f'{k}={t:.0f}' for k, t in times.items())}) -> {art.path}"
        )
    return art


# --------------------------------------------------------------------------------------------
# Kernel reports (lockdep, KASAN, WARNING, BUG ...) in dmesg

# (kind, pattern), the first match wins: specific reports before the generic "BUG: ".
REPORT_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("lockdep", r"WARNING: possible circular locking dependency detected"),
        ("lockdep", r"WARNING: possible recursive locking detected"),
        ("lockdep", r"WARNING: inconsistent lock state"),
        ("lockdep", r"WARNING: possible irq lock inversion dependency detected"),
        ("lockdep", r"WARNING: \S+-safe -> \S+-unsafe lock order detected"),
        ("lockdep", r"WARNING: bad unlock balance detected"),
        ("lockdep", r"WARNING: held lock freed"),
        ("lockdep", r"WARNING: lock held when returning to user space"),
        ("lockdep", r"WARNING: Nested lock was not taken"),
        ("lockdep", r"BUG: MAX_LOCK\w* too low"),
        ("rcu", r"WARNING: suspicious RCU usage"),
        ("atomic-sleep", r"BUG: sleeping function called from invalid context"),
        ("atomic-sleep", r"BUG: scheduling while atomic"),
        ("kasan", r"BUG: KASAN: "),
        ("ubsan", r"UBSAN: "),
        ("warning", r"WARNING: CPU: \d+ PID: \d+"),
        ("bug", r"kernel BUG at "),
        ("gpf", r"general protection fault"),
        ("oops", r"Oops: "),
        ("bug", r"BUG: "),
        ("rcu-stall", r"INFO: \S+ (self-)?detected stalls?"),
        ("panic", r"Kernel panic - not syncing"),
        ("hung-task", r"INFO: task \S+ blocked for more than \d+ seconds"),
    )
)
# Kinds that lockdep itself reports (after which it turns itself off: debug_locks = 0).
LOCKDEP_KINDS = frozenset({"lockdep", "rcu"})
# The guest tests write these into /dev/kmsg (tests/vm/guest/conftest.py) to attribute reports.
KMSG_MARKER = "dmabufd-vm: test"
_MARKER_RE = re.compile(r"^dmabufd-vm: test (start|end) (.+)$")
_TIMESTAMP_RE = re.compile(r"^\[\s*\d+\.\d+\]\s?")
_CALLER_RE = re.compile(r"^\[\s*[TC]\d+\]\s?")
_KMSG_ESCAPE_RE = re.compile(rb"\\x([0-9a-fA-F]{2})")
# An "Oops:" line this close after a BUG/KASAN/... title belongs to that report.
_OOPS_MERGE_LINES = 15


@dataclasses.dataclass(frozen=True)
class KernelReport:
    kind: str  # lockdep, rcu, atomic-sleep, kasan, ubsan, warning, bug, gpf, oops, panic, ...
    title: str  # the line that starts the report
    lines: tuple[str, ...]  # its first lines, the title first
    during: str | None = None  # the guest test that was running (from the kmsg markers), if known

    def text(self) -> str:
        where = f" (during {self.during})" if self.during else ""
        return f"[{self.kind}]{where}\n" + "\n".join(f"    {line}" for line in self.lines)


def _clean_kernel_line(line: str) -> str:
    line = line.rstrip("\r\n")
    line = _TIMESTAMP_RE.sub("", line, count=1)
    return _CALLER_RE.sub("", line, count=1)


def report_kind(line: str) -> str | None:
    """The kind of report a (cleaned) dmesg line starts, or None."""
    if line.startswith(KMSG_MARKER):
        return None
    for kind, pattern in REPORT_PATTERNS:
        if pattern.search(line):
            return kind
    return None


def parse_kernel_reports(text: str | Iterable[str], *, max_lines: int = 40) -> list[KernelReport]:
    """The kernel reports in a dmesg text (or lines), each with up to `max_lines` first lines.

    Lines may carry dmesg's "[ 12.345678]" timestamps. The guest tests' kmsg markers
    ("dmabufd-vm: test start NODEID") tell which test each report happened in.
    """
    lines = text.splitlines() if isinstance(text, str) else list(text)
    reports: list[KernelReport] = []
    during: str | None = None
    current: list[str] = []
    kind = ""
    cur_during: str | None = None
    open_ = False

    def close() -> None:
        nonlocal open_, current
        if current:
            reports.append(KernelReport(kind, current[0], tuple(current), cur_during))
        current = []
        open_ = False

    for raw in lines:
        line = _clean_kernel_line(raw)
        marker = _MARKER_RE.match(line)
        if marker:
            if open_:
                open_ = False  # a report never spans a test boundary; keep what was collected
            during = marker.group(2) if marker.group(1) == "start" else f"after {marker.group(2)}"
            continue
        new_kind = report_kind(line)
        merge = new_kind == "oops" and bool(current) and len(current) < _OOPS_MERGE_LINES and kind != "oops"
        if new_kind is not None and not merge:
            close()
            kind, cur_during, current, open_ = new_kind, during, [line], True
            continue
        if open_:
            current.append(line)
            ended = len(current) > 2 and (set(line.strip()) == {"="} or "---[ end trace" in line)
            if ended or len(current) >= max_lines:
                open_ = False
    close()
    return reports


def kmsg_record_lines(record: bytes) -> list[str]:
    """The message lines of one /dev/kmsg record ("prio,seq,usec,flags;text\\n KEY=v\\n ...")."""
    _, sep, rest = record.partition(b";")
    if not sep:
        return []
    text = rest.split(b"\n", 1)[0]  # continuation lines (" KEY=value") are metadata
    text = _KMSG_ESCAPE_RE.sub(lambda m: bytes([int(m.group(1), 16)]), text)
    return text.decode(errors="replace").splitlines()


def parse_debug_locks(lockdep_stats: str) -> int | None:
    """debug_locks from /proc/lockdep_stats: 1 while lockdep works, 0 once it turned itself off."""
    m = re.search(r"^\s*debug_locks:\s*(\d+)", lockdep_stats, re.MULTILINE)
    return int(m.group(1)) if m else None


def count_reports(reports: Sequence[KernelReport]) -> str:
    """ "2 kernel report(s) (kasan, warning)", or "no kernel reports"."""
    if not reports:
        return "no kernel reports"
    return f"{len(reports)} kernel report(s) ({', '.join(sorted({r.kind for r in reports}))})"


def format_reports(reports: Sequence[KernelReport]) -> str:
    if not reports:
        return "no kernel reports"
    return f"{len(reports)} kernel report(s):\n" + "\n".join(r.text() for r in reports)


# --------------------------------------------------------------------------------------------
# Disks

DiskFs = Literal["ext4", "f2fs", "raw"]
_DISK_FS: dict[str, DiskFs] = {"ext4": "ext4", "f2fs": "f2fs", "raw": "raw", "none": "raw"}
# Serial numbers of virtio-blk disks (how the guest finds them) hold at most 20 bytes.
_DISK_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,19}$")
_MIN_DISK_MB: dict[str, int] = {"ext4": 8, "f2fs": 64, "raw": 1}
_RESERVED_DISK_NAMES = frozenset({"results"})


@dataclasses.dataclass(frozen=True)
class DiskSpec:
    """A virtio-blk disk made on the host for one run, mounted at /mnt/<name> unless raw."""

    fs: DiskFs
    size_mb: int
    name: str

    def __post_init__(self) -> None:
        if not _DISK_NAME_RE.match(self.name) or self.name in _RESERVED_DISK_NAMES:
            raise VMError(f"bad disk name {self.name!r} (a-z, 0-9, '_'; at most 20; not 'results')")
        if self.size_mb < _MIN_DISK_MB[self.fs]:
            raise VMError(f"disk {self.name}: {self.size_mb} MiB is too small for {self.fs}")

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        """FS:SIZE_MB[:NAME], FS one of ext4, f2fs, raw (or none); NAME defaults to FS."""
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise VMError(f"bad disk spec {text!r} (FS:SIZE_MB[:NAME], e.g. f2fs:1024)")
        fs = _DISK_FS.get(parts[0].lower())
        if fs is None:
            raise VMError(f"bad disk spec {text!r}: file system must be ext4, f2fs or raw")
        try:
            size = int(parts[1])
        except ValueError:
            raise VMError(f"bad disk spec {text!r}: size must be a number of MiB") from None
        return cls(fs, size, parts[2] if len(parts) == 3 else fs)

    @property
    def mountpoint(self) -> str | None:
        return None if self.fs == "raw" else f"/mnt/{self.name}"

    @property
    def env_var(self) -> str:
        return f"DMABUFD_VM_DISK_{self.name.upper()}"


def scratch_disk(size_mb: int = 1024) -> DiskSpec:
    return DiskSpec("ext4", size_mb, SCRATCH_NAME)


def run_disks(disk_mb: int, disks: Sequence[DiskSpec]) -> list[DiskSpec]:
    """The disks of a run, in drive order: the ext4 scratch disk, then the extra ones."""
    out = [scratch_disk(disk_mb), *disks]
    seen: set[str] = set()
    for d in out:
        if d.name in seen:
            raise VMError(f"two disks are named {d.name!r} (the default ext4 disk is {SCRATCH_NAME!r})")
        seen.add(d.name)
    return out


def disk_env(disks: Sequence[DiskSpec]) -> dict[str, str]:
    """Where each formatted disk is mounted (raw disks' devices are known only in the guest)."""
    out: dict[str, str] = {}
    for d in disks:
        if d.mountpoint is None:
            continue
        out[d.env_var] = d.mountpoint
        if d.fs == "ext4":
            out.setdefault("DMABUFD_VM_SCRATCH", d.mountpoint)
        if d.fs == "f2fs":
            out.setdefault("DMABUFD_VM_F2FS", d.mountpoint)
    return out


def make_disk_image(path: Path, disk: DiskSpec) -> None:
    """A sparse image of the disk's size, formatted on the host (the guest has no mkfs)."""
    with open(path, "wb") as fh:
        fh.truncate(disk.size_mb * 1024 * 1024)
    if disk.fs == "raw":
        return
    if disk.fs == "ext4":
        mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
        argv = [mkfs, "-q", "-F", "-L", disk.name, "-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)]
    else:
        mkfs = shutil.which("mkfs.f2fs") or "/sbin/mkfs.f2fs"
        if not Path(mkfs).exists():
            raise MissingDependenciesError("mkfs.f2fs not found (Debian package f2fs-tools)")
        argv = [mkfs, "-q", "-f", "-l", disk.name, str(path)]
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VMError(f"{Path(mkfs).name} failed for disk {disk.name}: {(proc.stderr or proc.stdout).strip()}")


# --------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class RunResult:
    returncode: int
    output: str
    console_log: Path
    boot_seconds: float | None  # host time from the last QEMU start to the guest init's first line
    ready_seconds: float | None  # ... to the guest having mounted everything
    wall_seconds: float
    timed_out: bool
    variant: str
    key: str
    accel: str
    dmesg: str = ""  # the guest kernel's log at the end of the run ("" if the guest died first)
    reports: list[KernelReport] = dataclasses.field(default_factory=list)
    debug_locks: int | None = None  # lockdep kernels: 0 once lockdep turned itself off
    dmesg_log: Path | None = None  # a copy of the dmesg kept on the host
    kernel: Path | None = None
    # boots killed because init never started (the last one too, when every attempt stalled)
    stalled_boots: list[StalledBoot] = dataclasses.field(default_factory=list)
    boots: int = 1  # QEMU processes started

    @property
    def init_never_started(self) -> bool:
        """No boot reached the guest's init (every one killed, timed out or exited before it)."""
        return self.boot_seconds is None

    def all_reports(self) -> list[KernelReport]:
        """The last boot's reports and those of the boots killed before it."""
        return [r for b in self.stalled_boots for r in b.reports] + self.reports

    def summary(self) -> str:
        boot = f"{self.boot_seconds:.1f}" if self.boot_seconds is not None else "?"
        ready = f"{self.ready_seconds:.1f}" if self.ready_seconds is not None else "?"
        reports = count_reports(self.reports)
        stalled = (
            f"; {len(self.stalled_boots)} boot(s) killed before init started ({self.stalled_boots_text()})"
            if self.stalled_boots
            else ""
        )
        return (
            f"{self.variant} kernel ({self.key}, {self.accel}): exit {self.returncode}"
            f"{' (TIMEOUT)' if self.timed_out else ''}; init started after {boot} s, "
            f"ready after {ready} s, total {self.wall_seconds:.1f} s; {reports}{stalled}; console {self.console_log}"
            + (f"; dmesg {self.dmesg_log}" if self.dmesg_log else "")
        )

    def reports_text(self) -> str:
        return format_reports(self.reports)

    def stalled_boots_text(self) -> str:
        return "; ".join(b.describe() for b in self.stalled_boots)

    def stalled_boots_reports(self) -> str:
        """Each killed boot, with its reports in full: printed beside reports_text()."""
        return "\n".join(
            f"boot killed before init: {b.describe()}" + (f"\n{format_reports(b.reports)}" if b.reports else "")
            for b in self.stalled_boots
        )


@dataclasses.dataclass(frozen=True)
class StalledBoot:
    """A boot killed because the guest's init had not started within the boot timeout."""

    waited: float  # seconds from its QEMU's start to the kill
    reports: tuple[KernelReport, ...]  # what its console showed (it never got to save a dmesg)

    def touches_our_code(self) -> bool:
        return any(OUR_KERNEL_CODE.search(line) for r in self.reports for line in r.lines)

    def describe(self) -> str:
        ours = ", one naming dma-buf code" if self.touches_our_code() else ""
        return f"killed after {self.waited:.0f} s, {count_reports(self.reports)}{ours}"


@dataclasses.dataclass(frozen=True)
class BootTarget:
    """What a run boots: a cached variant's artifact, or a bzImage given by path."""

    name: str
    bzimage: Path
    key: str
    patched: bool
    kernel_args: str
    selftests: Path | None
    timeout_scale: float = 1.0


def guest_env(
    target: BootTarget,
    patched_selftests: Path | None,
    disks: Sequence[DiskSpec],
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
    # The host's own DMABUFD_VM_DISK_* must not describe disks this guest does not have.
    for k in [k for k in out if k.startswith("DMABUFD_VM_DISK_")]:
        del out[k]
    out.update(
        HOME="/tmp/home",
        TMPDIR="/tmp",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        DMABUFD_IN_VM="1",
        DMABUFD_VM_VARIANT=target.name,
        # What the guest tests key on: the series' behaviour, whatever the variant's name.
        DMABUFD_VM_PATCHED="1" if target.patched else "0",
        DMABUFD_VM_KEY=target.key,
        DMABUFD_VM_TIMEOUT_SCALE=f"{target.timeout_scale:g}",
        DMABUFD_VM_RESULTS=GUEST_RESULTS,
        DMABUFD_VM_PYTHON=sys.executable,
    )
    out.pop("DMABUFD_VM_SCRATCH", None)
    out.pop("DMABUFD_VM_F2FS", None)
    out.update(disk_env(disks))
    if target.selftests is not None:
        out["DMABUFD_VM_SELFTESTS"] = str(target.selftests)
    else:
        out.pop("DMABUFD_VM_SELFTESTS", None)
    if patched_selftests is not None:
        out["DMABUFD_VM_PATCHED_SELFTESTS"] = str(patched_selftests)
    out.update(extra)
    return out


def _disk_var(index: int) -> str:
    return f"disk_{index}"


def render_init(
    cmd: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    disks: Sequence[DiskSpec] = (scratch_disk(),),
) -> str:
    """The guest's /sbin/init for one run (a POSIX sh script, run as PID 1)."""
    q = shlex.quote
    env_args = [q(f"{k}={v}") for k, v in sorted(env.items())]
    # A raw disk's device is only known once the guest has found it by serial.
    env_args += [f'"{d.env_var}=${_disk_var(i)}"' for i, d in enumerate(disks) if d.mountpoint is None]
    py = q(env.get("DMABUFD_VM_PYTHON", sys.executable))
    disk_lines = []
    for i, d in enumerate(disks):
        var = _disk_var(i)
        disk_lines.append(f"{var}=$(disk_dev {d.name} vd{chr(ord('a') + i)})")
        if d.mountpoint is not None:
            mnt = q(d.mountpoint)
            disk_lines.append(f"mkdir -p {mnt}")
            disk_lines.append(f'mount -t {d.fs} -o noatime "${var}" {mnt} && chmod 1777 {mnt} || setup=disk-{d.name}')
    umounts = [f"umount {q(d.mountpoint)} 2>/dev/null" for d in reversed(disks) if d.mountpoint is not None]
    nl = "\n"
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
mkdir -p {GUEST_RESULTS}
setup=ok
# The working directory comes on a share of its own, mounted at its host
# path: a checkout under /tmp or /run would otherwise be hidden by the tmpfs.
mkdir -p {q(str(cwd))}
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro workdir {q(str(cwd))} || setup=workdir
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results {GUEST_RESULTS} || setup=results
# Disks are found by the serial the host gave them (falling back to the drive order).
disk_dev() {{
    for d in /sys/block/vd*; do
        if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${{d##*/}}"; return 0; fi
    done
    echo "/dev/$2"
}}
{nl.join(disk_lines)}
echo "{READY_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime) setup=$setup"
if [ "$setup" = ok ]; then
    cd {q(str(cwd))} || cd /
    {{ env -i {" ".join(env_args)} {shlex.join(cmd)} < /dev/null; echo $? > {GUEST_RESULTS}/rc; }} 2>&1 \\
        | tee {GUEST_RESULTS}/output
else
    echo "guest setup failed: $setup" | tee {GUEST_RESULTS}/output
    echo 125 > {GUEST_RESULTS}/rc
fi
echo "{DONE_MARKER} rc=$(cat {GUEST_RESULTS}/rc 2>/dev/null) uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /
sync
{nl.join(umounts)}
# The kernel's log after everything (unmounting included) for the host's report check; dmesg
# is the host's util-linux one, through the 9p root.
[ -r /proc/lockdep_stats ] && cat /proc/lockdep_stats > {GUEST_RESULTS}/lockdep_stats
dmesg > {GUEST_RESULTS}/dmesg 2>&1
sync
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
    drives: Sequence[tuple[Path, str]],
    *,
    workdir: Path,
    mem: str,
    smp: int,
    accel: str,
    cache_mode: str,
    kernel_args: str = "",
) -> list[str]:
    """QEMU's argv; `drives` are (image, serial) pairs, attached as virtio-blk in that order."""
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
            BOOT_KERNEL_ARGS,
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
    ]
    for i, (image, serial) in enumerate(drives):
        # A real block device (not 9p) with the host page cache bypassed when it can be: what
        # O_DIRECT inside the guest (ext4 and f2fs alike) needs to mean what it says.
        argv += [
            "-drive",
            f"file={image},if=none,id=drive{i},format=raw,cache={cache_mode}",
            "-device",
            f"virtio-blk-pci,drive=drive{i},serial={serial}",
        ]
    argv += ["-nic", "none"]
    return argv


def _resolve_target(
    variant: str | Variant | None,
    *,
    kernel: Path | None,
    selftests: Path | None,
    cache: Cache,
    inputs: Inputs | None,
    build_if_missing: bool,
    log: TextIO,
) -> BootTarget:
    v = _as_variant(variant, cache) if variant is not None else None
    if kernel is not None:
        if not kernel.is_file():
            raise VMError(f"no such kernel image: {kernel}")
        # A kernel copied out of the cache keeps its build.json: it says what the kernel is.
        info = _read_build_json(kernel.parent)
        name = v.name if v else str(info.get("variant") or "custom")
        patched = v.patched if v else bool(info.get("patched", True))
        if v is None and "patched" not in info:
            log.write(f"[dmabufd-vm] {kernel}: no build.json beside it; assuming it carries the series\n")
        args = v.kernel_args if v else str(info.get("kernel_args", ""))
        scale = v.timeout_scale if v else _as_float(info.get("timeout_scale"), 1.0)
        if selftests is None and (kernel.parent / "selftests").is_dir():
            selftests = kernel.parent / "selftests"
        return BootTarget(name, kernel, str(info.get("key", "-")), patched, args, selftests, scale)
    if v is None:
        raise VMError("run needs a variant or a kernel image")
    inputs = inputs or resolve_inputs()
    art = cached_artifact(v, cache, inputs)
    if art is None:
        if not build_if_missing:
            raise VMError(f"no cached {v.name} kernel for the current inputs; run `build --variant {v.name}` first")
        art = build(v, cache=cache, inputs=inputs, log=log)
    return BootTarget(
        v.name, art.bzimage, art.key, v.patched, v.kernel_args, selftests or art.selftests, v.timeout_scale
    )


def run(
    variant: str | Variant | None,
    cmd: Sequence[str],
    *,
    kernel: Path | None = None,
    selftests: Path | None = None,
    disks: Sequence[DiskSpec] = (),
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
    boot_timeout: float = BOOT_TIMEOUT_S,
    boot_attempts: int = BOOT_ATTEMPTS,
) -> RunResult:
    """Boot a kernel, run `cmd` inside, return its exit code, output, dmesg and kernel reports.

    The kernel is the variant's cached one (built first unless `build_if_missing` is false), or
    `kernel` (a bzImage; with a build.json beside it, as in the cache, that says its variant).
    `disks` are attached after the ext4 scratch disk of `disk_mb` MiB.

    A boot whose init has not started `boot_timeout` seconds after QEMU did is killed and, up to
    `boot_attempts` boots in all, started again; `timeout` bounds all of them together. Each
    killed boot, with the kernel reports its console showed, is in the result's `stalled_boots`.
    """
    if boot_attempts < 1:
        raise VMError(f"boot_attempts must be at least 1, not {boot_attempts}")
    cache = cache or Cache(default_cache_dir())
    log = console if console is not None else sys.stderr
    if shutil.which("qemu-system-x86_64") is None:
        raise MissingDependenciesError("qemu-system-x86_64 not found (Debian package qemu-system-x86)")
    all_disks = run_disks(disk_mb, disks)
    target = _resolve_target(
        variant,
        kernel=kernel,
        selftests=selftests,
        cache=cache,
        inputs=inputs,
        build_if_missing=build_if_missing,
        log=log,
    )
    patched_selftests: Path | None = None
    if not target.patched:
        with contextlib.suppress(VMError):
            patched_art = cached_artifact("patched", cache, inputs or resolve_inputs())
            patched_selftests = patched_art.selftests if patched_art else None
    if accel is None:
        accel = os.environ.get("DMABUFD_VM_ACCEL", "tcg")
    if accel == "auto":
        accel = "kvm" if _kvm_usable() else "tcg"

    for what, path in (("cache", cache.root), ("selftests", target.selftests)):
        hidden = _hidden_in_guest(path.resolve()) if path is not None else None
        if hidden:
            raise VMError(
                f"the {what} {path} is under {hidden}, which the guest mounts a tmpfs over: "
                "the kernel's selftests and the init script would be invisible there; "
                "put it elsewhere (for the cache: DMABUFD_VM_CACHE or --cache)"
            )
    cache.runs.mkdir(parents=True, exist_ok=True)
    cache.logs.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix=f"run-{target.name}-", dir=cache.runs))
    results = rundir / "results"
    results.mkdir()
    os.chmod(rundir, 0o755)
    os.chmod(results, 0o777)
    drives: list[tuple[Path, str]] = []
    for disk in all_disks:
        image = rundir / f"disk-{disk.name}.img"
        make_disk_image(image, disk)
        drives.append((image, disk.name))
    init = rundir / "init.sh"
    workdir = (cwd or Path.cwd()).resolve()
    init.write_text(render_init(cmd, workdir, guest_env(target, patched_selftests, all_disks, env or {}), all_disks))
    init.chmod(0o755)
    console_path = console_log or cache.logs / f"console-{rundir.name}.log"
    argv = qemu_command(
        target.bzimage,
        init,
        results,
        drives,
        workdir=workdir,
        mem=mem,
        smp=smp,
        accel=accel,
        cache_mode="none" if _supports_odirect(rundir) else "writeback",
        kernel_args=" ".join(a for a in (target.kernel_args, kernel_args) if a),
    )
    t0 = time.monotonic()
    deadline = t0 + timeout
    stalled: list[StalledBoot] = []
    boots = 0
    with open(console_path, "w") as clog:
        clog.write(f"# {shlex.join(argv)}\n")
        while True:
            boots += 1
            clog.write(f"# boot {boots} of up to {boot_attempts}\n")
            clog.flush()
            start = console_path.stat().st_size
            boot = _boot(argv, clog, console, deadline=deadline, boot_timeout=boot_timeout)
            if boot.killed_after is None or not boot.stalled:
                break
            # A killed boot never saved a dmesg: its reports come from the console, with more lines
            # each (a KASAN report's allocation and free stacks come after its first 40 lines).
            reports = parse_kernel_reports(_console_since(console_path, start), max_lines=STALLED_REPORT_LINES)
            stalled.append(StalledBoot(boot.killed_after, tuple(reports)))
            if boots >= boot_attempts or time.monotonic() >= deadline:
                break
            log.write(f"[dmabufd-vm] init did not start within {boot_timeout:.0f} s; booting again\n")
    timed_out = boot.timed_out
    marks = boot.marks
    wall = time.monotonic() - t0
    rc_file, out_file = results / "rc", results / "output"
    output = out_file.read_text(errors="replace") if out_file.exists() else ""
    try:
        rc = int(rc_file.read_text().strip())
    except (OSError, ValueError):
        rc = 124 if timed_out or boot.stalled else 255
        tail = "".join(console_path.read_text(errors="replace").splitlines(True)[-40:])
        if boot.stalled:
            why = f"init never started in {boots} boot(s) of up to {boot_timeout:.0f} s each"
        elif timed_out:
            why = f"timeout after {timeout:.0f} s"
        else:
            why = f"qemu exited {boot.returncode}"
        output += f"\n[dmabufd-vm] the guest did not report an exit code ({why}); console tail:\n{tail}"
    # A last boot killed before init has its reports in `stalled` already.
    last_boot_start = console_path.stat().st_size if boot.stalled else start
    dmesg, reports, debug_locks, dmesg_log = _collect_kernel_log(
        results, console_path, cache, rundir.name, console_start=last_boot_start
    )
    result = RunResult(
        returncode=rc,
        output=output,
        console_log=console_path,
        boot_seconds=marks.get(INIT_MARKER),
        ready_seconds=marks.get(READY_MARKER),
        wall_seconds=wall,
        timed_out=timed_out,
        variant=target.name,
        key=target.key,
        accel=accel,
        dmesg=dmesg,
        reports=reports,
        debug_locks=debug_locks,
        dmesg_log=dmesg_log,
        kernel=target.bzimage,
        stalled_boots=stalled,
        boots=boots,
    )
    if not keep:
        shutil.rmtree(rundir, ignore_errors=True)
    log.write(f"[dmabufd-vm] {result.summary()}\n")
    if reports:
        log.write(f"[dmabufd-vm] {format_reports(reports)}\n")
    log.flush()
    return result


@dataclasses.dataclass(frozen=True)
class _Boot:
    marks: dict[str, float]  # console marker -> seconds after this boot's QEMU started
    returncode: int | None
    timed_out: bool  # killed at the run's deadline
    stalled: bool  # killed because init had not started within the boot timeout
    killed_after: float | None = None  # seconds from QEMU's start to a kill before init started


def _boot(argv: Sequence[str], clog: TextIO, console: TextIO | None, *, deadline: float, boot_timeout: float) -> _Boot:
    """One QEMU process, from start to exit or kill, its console appended to `clog`."""
    t0 = time.monotonic()
    marks = _ConsoleMarks(t0)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    reader = threading.Thread(target=_pump_console, args=(proc.stdout, clog, console, marks), daemon=True)
    reader.start()
    timed_out = stalled = False
    killed_after: float | None = None
    boot_deadline = min(t0 + boot_timeout, deadline)
    # Polled, so that a QEMU that exits before init started (a panic, a bad option) ends it too.
    while not marks.init_started.wait(0.2) and proc.poll() is None:
        now = time.monotonic()
        if now >= boot_deadline and not marks.init_started.is_set():
            stalled = now < deadline
            timed_out = not stalled
            killed_after = now - t0
            proc.kill()
            break
    if killed_after is None:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
    proc.wait()
    # The console pipe ends with QEMU: this join is quick, and the next boot's section of the
    # console log starts only after it.
    reader.join(timeout=10)
    return _Boot(marks.seen, proc.returncode, timed_out, stalled, killed_after)


def _console_since(console_path: Path, start: int) -> str:
    with open(console_path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def _collect_kernel_log(
    results: Path, console_path: Path, cache: Cache, run_name: str, console_start: int = 0
) -> tuple[str, list[KernelReport], int | None, Path | None]:
    """(dmesg, reports in it, debug_locks, host copy of the dmesg) once the guest is gone.
    `console_start`: where the last boot's own part of the console log begins (the boots killed
    before init are reported on their own; when the last one was such a boot, the log's end)."""
    dmesg_file = results / "dmesg"
    dmesg = dmesg_file.read_text(errors="replace") if dmesg_file.exists() else ""
    dmesg_log: Path | None = None
    if dmesg:
        dmesg_log = cache.logs / f"dmesg-{run_name}.log"
        dmesg_log.write_text(dmesg)
        reports = parse_kernel_reports(dmesg)
    else:
        # The guest died before saving it: the console has what reached it (the command's
        # output is there too, so this is a fallback only).
        reports = parse_kernel_reports(_console_since(console_path, console_start))
    stats = results / "lockdep_stats"
    debug_locks = parse_debug_locks(stats.read_text(errors="replace")) if stats.exists() else None
    if debug_locks == 0 and not any(r.kind in LOCKDEP_KINDS for r in reports):
        line = "lockdep turned itself off (debug_locks = 0) with no lockdep report in dmesg"
        reports.append(KernelReport("lockdep", line, (line,)))
    return dmesg, reports, debug_locks, dmesg_log


class _ConsoleMarks:
    """The init script's markers seen on one boot's console, in seconds after its QEMU started."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.seen: dict[str, float] = {}
        self.init_started = threading.Event()  # set by the console reader, waited on by _boot


def _pump_console(stream: IO[bytes], clog: TextIO, console: TextIO | None, marks: _ConsoleMarks) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        for marker in (INIT_MARKER, READY_MARKER, DONE_MARKER):
            if marker in line and marker not in marks.seen:
                marks.seen[marker] = time.monotonic() - marks.t0
                if marker == INIT_MARKER:
                    marks.init_started.set()
        clog.write(line)
        clog.flush()
        if console is not None:
            console.write(line)
            console.flush()


# --------------------------------------------------------------------------------------------
# Status and pruning


def all_variants(cache: Cache) -> dict[str, Variant]:
    return {**BUILTIN_VARIANTS, **cache.custom_variants()}


def _current_keys(cache: Cache, inputs: Inputs) -> dict[str, str | None]:
    """name -> current key (None: cannot be built now, e.g. no patches or a fragment gone)."""
    out: dict[str, str | None] = {}
    for name, v in all_variants(cache).items():
        try:
            spec = spec_for(v, inputs)
            out[name] = None if v.patched and not spec.patches else spec.key()
        except (OSError, VMError):
            out[name] = None
    return out


def _split_artifact_name(dirname: str) -> tuple[str, str]:
    name, _, key = dirname.rpartition("-")
    return name, key


def status(cache: Cache | None = None, inputs: Inputs | None = None) -> str:
    cache = cache or Cache(default_cache_dir())
    lines = [f"cache: {cache.root}"]
    current: dict[str, str | None] = {}
    variants = all_variants(cache)
    try:
        inputs = inputs or resolve_inputs()
        lines.append(f"source: {SOURCE_PACKAGE} {inputs.source_version} ({inputs.tarball})")
        lines.append(f"fragment: {inputs.fragment}")
        lines.append(f"patches: {len(inputs.patches)} in {default_patch_dir()}")
        current = _current_keys(cache, inputs)
    except VMError as e:
        lines.append(f"inputs: unavailable ({e})")
    for name, v in variants.items():
        kind = "built-in" if v.builtin else "custom"
        extra = ", ".join(str(f) for f in v.extra_fragments) or "-"
        lines.append(
            f"variant {name} ({kind}; series: {'yes' if v.patched else 'no'}; extra fragments: {extra}): "
            f"current key {current.get(name) or '-'}"
        )
    arts = sorted(cache.artifacts.glob("*-*")) if cache.artifacts.is_dir() else []
    if not arts:
        lines.append("no kernels cached")
    for path in arts:
        name, key = _split_artifact_name(path.name)
        art = Artifact(name, key, path)
        info = art.info
        mark = "current" if current.get(name) == key else ("stale" if name in variants else "orphan")
        times = info.get("times", {})
        total = times.get("total_s") if isinstance(times, dict) else None
        tests = sorted(p.name for p in art.selftests.glob("*/*") if p.is_file())
        lines.append(
            f"  {path.name}: {mark}, {'complete' if art.complete() else 'INCOMPLETE'}, "
            f"built {info.get('built_at', '?')} in {total} s, selftests: {', '.join(tests) or '-'}"
        )
    for name in variants:
        st = _read_state(cache.tree(name))
        if st:
            lines.append(f"tree {name}: {cache.tree(name)} built_key={st.get('built_key', '-')}")
    for path in sorted(cache.keep.glob("*/bzImage")) if cache.keep.is_dir() else []:
        info = _read_build_json(path.parent)
        lines.append(f"kept: {path} (variant {info.get('variant', '?')}, key {info.get('key', '?')})")
    return "\n".join(lines)


def prune(cache: Cache, inputs: Inputs, *, custom: bool = False) -> list[Path]:
    """Remove stale built-in kernels and leftover run dirs; custom variants too if `custom`.

    Every built-in variant's current artifact is kept; custom variants' artifacts (and their
    trees and definitions) go only when asked. keep/ is never touched.
    """
    current = _current_keys(cache, inputs)
    removed: list[Path] = []
    with cache.lock():
        for path in sorted(cache.artifacts.glob("*")) if cache.artifacts.is_dir() else []:
            name, key = _split_artifact_name(path.name)
            builtin = name in BUILTIN_VARIANTS
            if (builtin and current.get(name) != key) or (not builtin and custom):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        if custom:
            for name in cache.custom_variants():
                for path in (cache.tree(name), cache.variants / f"{name}.json"):
                    if path.is_dir():
                        _rm_rf(path)
                        removed.append(path)
                    elif path.exists():
                        path.unlink()
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
    p.add_argument("--fragment", type=Path, help="same as build --fragment (only with build --name)")
    p.add_argument("--patch-dir", type=Path, help="same as build --patch-dir (only with build --name)")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find cached) kernels")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--variant", help=f"a built-in ({', '.join(VARIANTS)}) or a custom variant built before")
    g.add_argument("--all", action="store_true", help=f"the built-in variants: {', '.join(VARIANTS)}")
    g.add_argument("--name", help="define (or redefine) a custom variant NAME and build it in its own tree")
    b.add_argument(
        "--extra-fragment",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="with --name: a Kconfig fragment merged after the base one (repeatable, in order)",
    )
    b.add_argument("--fragment", type=Path, dest="build_fragment", help="with --name: replaces the base fragment")
    pg = b.add_mutually_exclusive_group()
    pg.add_argument("--patch-dir", type=Path, dest="build_patch_dir", help="with --name: the series to apply")
    pg.add_argument("--no-patches", action="store_true", help="with --name: no series (a stock-based variant)")
    b.add_argument("--kernel-args", default="", help="with --name: boot options every run of it gets")
    b.add_argument("-j", "--jobs", type=int, help="make -j (default: nproc)")
    b.add_argument("--no-install", action="store_true", help="never run apt-get")
    r = sub.add_parser("run", help="boot a kernel and run a command inside")
    r.add_argument("--variant", help=f"a cached variant ({', '.join(VARIANTS)} or a custom one)")
    r.add_argument("--kernel", type=Path, help="boot this bzImage instead (its build.json, if beside it, names it)")
    r.add_argument("--selftests", type=Path, help="with --kernel: the selftest binaries (default: beside it)")
    r.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="FS:SIZE_MB[:NAME]",
        help="another disk (ext4, f2fs or raw), mounted at /mnt/NAME (repeatable)",
    )
    r.add_argument("--mem", default="2G")
    r.add_argument("--smp", type=int, default=2)
    r.add_argument("--disk-mb", type=int, default=1024, help="size of the ext4 scratch disk")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run, every boot included")
    r.add_argument(
        "--boot-timeout",
        type=float,
        default=BOOT_TIMEOUT_S,
        help="kill a boot whose init has not started after this many seconds (default %(default)g)",
    )
    r.add_argument("--boot-attempts", type=int, default=BOOT_ATTEMPTS, help="boots to try in all (default %(default)d)")
    r.add_argument("--accel", choices=("tcg", "kvm", "auto"), help="default tcg (or $DMABUFD_VM_ACCEL)")
    r.add_argument("--env", action="append", default=[], metavar="K=V")
    r.add_argument("--console-log", type=Path, help="write the guest console here")
    r.add_argument("--quiet", action="store_true", help="do not stream the console to stderr")
    r.add_argument("--no-build", action="store_true", help="fail if the kernel is not cached")
    r.add_argument("--keep", action="store_true", help="keep the run dir (init, disk images, results)")
    r.add_argument("--kernel-args", default="", help="extra kernel command line")
    r.add_argument("--fail-on-reports", action="store_true", help="exit 1 if the kernel reported anything")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    sub.add_parser("status", help="what is cached")
    pr = sub.add_parser("prune", help="remove stale built-in kernels and old run dirs")
    pr.add_argument("--custom", action="store_true", help="also remove every custom variant (kernels, trees)")
    return p.parse_args(argv)


def _custom_variant(args: argparse.Namespace) -> Variant:
    name = str(args.name)
    if name in BUILTIN_VARIANTS:
        raise VMError(f"{name} is a built-in variant: give the custom one another name")
    fragment = args.build_fragment or args.fragment
    patch_dir = args.build_patch_dir or args.patch_dir
    if patch_dir is not None and args.no_patches:
        raise VMError("--patch-dir and --no-patches exclude each other")
    return Variant(
        name,
        patched=not args.no_patches,
        extra_fragments=tuple(f.resolve() for f in args.extra_fragment),
        fragment=fragment.resolve() if fragment else None,
        patch_dir=patch_dir.resolve() if patch_dir else None,
        kernel_args=str(args.kernel_args),
        description="custom (build --name)",
    )


def _main_build(args: argparse.Namespace, cache: Cache) -> int:
    custom_only = (
        args.fragment or args.patch_dir or args.build_fragment or args.build_patch_dir or args.no_patches
    ) or args.extra_fragment
    if (custom_only or args.kernel_args) and not args.name:
        raise VMError(
            "--fragment, --patch-dir, --no-patches, --extra-fragment and --kernel-args make a different "
            "kernel: name it with `build --name NAME ...` (the built-in variants never change)"
        )
    if not args.no_install:
        ensure_dependencies(sys.stderr)
    inputs = resolve_inputs()
    variants: list[Variant]
    if args.name:
        variants = [_custom_variant(args)]
    elif args.all:
        variants = list(BUILTIN_VARIANTS.values())
        if not inputs.patches:
            print("[dmabufd-vm] no patches yet: building stock only", file=sys.stderr)
            variants = [v for v in variants if not v.patched]
    else:
        variants = [get_variant(args.variant, cache)]
    for v in variants:
        art = build(v, cache=cache, inputs=inputs, jobs=args.jobs, install=False)
        print(f"{v.name}: {art.path} {json.dumps(art.info.get('times', {}))}")
    return 0


def _main_run(args: argparse.Namespace, cache: Cache) -> int:
    if args.fragment or args.patch_dir:
        raise VMError("--fragment/--patch-dir belong to `build --name NAME`; run it with `run --variant NAME`")
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("run: no command given (use: run --variant stock -- CMD ...)", file=sys.stderr)
        return 2
    if args.variant is None and args.kernel is None:
        print("run: give --variant NAME or --kernel BZIMAGE", file=sys.stderr)
        return 2
    if args.selftests is not None and args.kernel is None:
        print("run: --selftests goes with --kernel (a variant has its own)", file=sys.stderr)
        return 2
    extra = dict(kv.split("=", 1) for kv in args.env)
    result = run(
        args.variant,
        cmd,
        kernel=args.kernel.resolve() if args.kernel else None,
        selftests=args.selftests.resolve() if args.selftests else None,
        disks=[DiskSpec.parse(d) for d in args.disk],
        cache=cache,
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
        boot_timeout=args.boot_timeout,
        boot_attempts=args.boot_attempts,
    )
    if args.quiet:
        sys.stdout.write(result.output)
    print(result.summary(), file=sys.stderr)
    if result.reports:
        print(result.reports_text(), file=sys.stderr)
    if result.stalled_boots:
        print(result.stalled_boots_reports(), file=sys.stderr)
    if args.fail_on_reports and result.returncode == 0 and result.all_reports():
        return 1
    return result.returncode


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    cache = Cache(args.cache or default_cache_dir())
    try:
        if args.command == "status":
            try:
                inputs: Inputs | None = resolve_inputs()
            except VMError:
                inputs = None
            print(status(cache, inputs))
            return 0
        if args.command == "prune":
            for path in prune(cache, resolve_inputs(), custom=args.custom):
                print(f"removed {path}")
            return 0
        if args.command == "build":
            return _main_build(args, cache)
        return _main_run(args, cache)
    except VMError as e:
        print(f"dmabufd-vm: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
