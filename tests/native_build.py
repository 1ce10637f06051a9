"""Build the native C++ client (clients/native) and run its ctest suite.

    build_dir = build_native(REPO)                    # <repo>/build/native, built or up to date
    result = run_ctest(build_dir, daemon.runtime_dir, scratch=tmp_path)
    assert result.failed == 0, result.output

build_native() configures the build directory once and then lets CMake
rebuild only what changed. The Debian packages the build needs are
installed with apt-get when this runs as root and one is missing;
otherwise it fails saying which are missing and the command to install
them. run_ctest() never writes to the build directory (ctest keeps its
logs in a scratch directory), so it also runs from a read-only checkout,
as in the VM guest.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# What each tool or library the build uses comes in (Debian 12).
TOOL_PACKAGES: dict[str, str] = {
    "cmake": "cmake",
    "ctest": "cmake",
    "pkg-config": "pkg-config",
    "c++": "g++",
    "cc": "gcc",
    "protoc": "protobuf-compiler",
    "grpc_cpp_plugin": "protobuf-compiler-grpc",
}
LIBRARY_PACKAGES: dict[str, str] = {"grpc++": "libgrpc++-dev", "protobuf": "libprotobuf-dev"}
# The build runs beside kernel builds on small machines: two jobs at most.
MAX_JOBS = 2
BUILD_TIMEOUT_S = 3600.0


class NativeBuildError(RuntimeError):
    """The native client cannot be built here; the message says why and what to do."""


@dataclass(frozen=True)
class CtestResult:
    passed: int
    failed: int
    total: int
    returncode: int
    output: str


def missing_packages(environment: Mapping[str, str] | None = None) -> list[str]:
    """The Debian packages the build needs that are not installed, sorted."""
    env = dict(os.environ if environment is None else environment)
    path = env.get("PATH")
    missing = {package for tool, package in TOOL_PACKAGES.items() if shutil.which(tool, path=path) is None}
    if shutil.which("pkg-config", path=path) is not None:
        for library, package in LIBRARY_PACKAGES.items():
            found = subprocess.run(["pkg-config", "--exists", library], env=env, check=False)
            if found.returncode != 0:
                missing.add(package)
    else:
        missing.update(LIBRARY_PACKAGES.values())
    return sorted(missing)


def ensure_build_packages() -> None:
    """Install what is missing (as root), or fail saying what is."""
    missing = missing_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0:
        raise NativeBuildError(
            f"building clients/native needs the Debian packages {', '.join(missing)}; "
            f"install them as root: {' '.join(command)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        # The package lists may be stale or absent (a fresh container): refresh once.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        installed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if installed.returncode != 0:
            raise NativeBuildError(f"{' '.join(command)} failed:\n{installed.stdout[-3000:]}{installed.stderr[-3000:]}")
    still = missing_packages()
    if still:
        raise NativeBuildError(f"still missing after apt-get install: {', '.join(still)}")


@contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """One build of a directory at a time (parallel test runs share it)."""
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f".{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _configured_source(build_dir: Path) -> Path | None:
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.split("=", 1)[1])
    return None


def _run(command: Sequence[str], what: str) -> None:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise NativeBuildError(f"{what} failed ({' '.join(command)}):\n{done.stdout[-6000:]}{done.stderr[-6000:]}")


def build_native(repo: Path, build_dir: Path | None = None) -> Path:
    """Configure (once) and build clients/native into `build_dir` (default
    <repo>/build/native); return the build directory. Only what changed is
    rebuilt: CMake tracks sources, the .proto files, and its own inputs."""
    source = repo / "clients" / "native"
    build_dir = build_dir or repo / "build" / "native"
    ensure_build_packages()
    with _build_lock(build_dir):
        configured = _configured_source(build_dir)
        if configured is not None and configured.resolve() != source.resolve():
            # A build directory of another checkout: CMake refuses to reuse it.
            shutil.rmtree(build_dir)
            configured = None
        if configured is None:
            _run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=RelWithDebInfo"], "cmake")
        jobs = max(1, min(MAX_JOBS, os.cpu_count() or 1))
        _run(["cmake", "--build", str(build_dir), "--parallel", str(jobs)], "cmake --build")
    return build_dir


_SUMMARY = re.compile(r"(\d+)% tests passed, (\d+) tests? failed out of (\d+)")


def run_ctest(
    build_dir: Path,
    runtime_dir: Path,
    *,
    scratch: Path,
    expect_heaps: Sequence[str] = (),
    timeout_s: float = 900.0,
) -> CtestResult:
    """Run the built conformance suite against the daemon at `runtime_dir`.

    ctest writes its logs next to the CTestTestfile it starts from, so it
    starts from one in `scratch` that includes the build's: the build
    directory may be read-only. `expect_heaps` must all be present (the
    suite fails otherwise; DMABUFD_NATIVE_EXPECT_HEAPS)."""
    if not (build_dir / "CTestTestfile.cmake").is_file():
        raise NativeBuildError(f"{build_dir} is not a built clients/native (no CTestTestfile.cmake)")
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "CTestTestfile.cmake").write_text(f'subdirs("{build_dir.resolve()}")\n')
    env = {
        **os.environ,
        "DMABUFD_RUNTIME_DIR": str(runtime_dir),
        "DMABUFD_NATIVE_EXPECT_HEAPS": ",".join(expect_heaps),
    }
    done = subprocess.run(
        ["ctest", "--test-dir", str(scratch), "--output-on-failure", "--no-tests=error"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    output = done.stdout + done.stderr
    summary = _SUMMARY.search(output)
    if summary is None:
        return CtestResult(0, 0, 0, done.returncode, output)
    failed, total = int(summary.group(2)), int(summary.group(3))
    return CtestResult(total - failed, failed, total, done.returncode, output)
