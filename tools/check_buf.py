#!/usr/bin/env python3
"""Check the gRPC API with buf: lint (protos/buf.yaml: STANDARD and
COMMENTS) and breaking changes against the last released API
(protos/released/, FILE rules). Exits 1 on any finding.

buf comes from npm (@bufbuild/buf, version BUF_VERSION, pinned so a new
buf cannot add rules under us), installed on first use into
${XDG_CACHE_HOME:-~/.cache}/dmabufd-buf, never into the repository. Set
DMABUFD_BUF to a buf binary to use that one instead.

Without npm (or without the registry), the check cannot run: with CI=true
that is a failure (CI must not pass by skipping it); otherwise it is
skipped with a message saying how to get buf, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
RELEASED = "released"
BUF_PACKAGE = "@bufbuild/buf"
BUF_VERSION = "1.75.0"
INSTALL_TIMEOUT_S = 600
RUN_TIMEOUT_S = 300
HOW_TO_GET_BUF = (
    "install Node.js and npm (Debian: apt-get install npm), after which this script installs "
    f"{BUF_PACKAGE}@{BUF_VERSION} by itself; or download buf {BUF_VERSION} "
    "(https://github.com/bufbuild/buf/releases) and set DMABUFD_BUF to its path"
)


class BufUnavailable(Exception):
    """buf is not installed and cannot be installed here."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmabufd-buf"


def _version(buf: Path) -> str:
    result = subprocess.run([str(buf), "--version"], capture_output=True, text=True, timeout=60, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def find_buf() -> Path:
    """The buf to run: $DMABUFD_BUF, or the pinned one in the cache
    (installed with npm if missing). Raises BufUnavailable."""
    override = os.environ.get("DMABUFD_BUF")
    if override:
        if not Path(override).is_file():
            raise BufUnavailable(f"DMABUFD_BUF={override} is not a file")
        return Path(override)
    prefix = cache_dir()
    buf = prefix / "node_modules" / ".bin" / "buf"
    if buf.exists() and _version(buf) == BUF_VERSION:
        return buf
    npm = shutil.which("npm")
    if npm is None:
        raise BufUnavailable(f"buf is not installed and npm is not on PATH: {HOW_TO_GET_BUF}")
    prefix.mkdir(parents=True, exist_ok=True)
    print(f"check_buf: installing {BUF_PACKAGE}@{BUF_VERSION} into {prefix} (npm)", file=sys.stderr)
    command = [
        npm,
        "install",
        "--prefix",
        str(prefix),
        "--no-save",
        "--no-package-lock",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
        f"{BUF_PACKAGE}@{BUF_VERSION}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise BufUnavailable(f"npm install {BUF_PACKAGE} took over {INSTALL_TIMEOUT_S} s: {HOW_TO_GET_BUF}") from None
    if result.returncode != 0 or not buf.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise BufUnavailable(f"npm install {BUF_PACKAGE} failed ({' / '.join(tail)}): {HOW_TO_GET_BUF}")
    installed = _version(buf)
    if installed != BUF_VERSION:
        raise BufUnavailable(f"npm installed buf {installed or '(it does not run)'}, not {BUF_VERSION}")
    return buf


@dataclass
class Findings:
    lint: list[str]
    breaking: list[str]

    @property
    def ok(self) -> bool:
        return not self.lint and not self.breaking


def _run(buf: Path, args: list[str], cwd: Path) -> list[str]:
    """Run buf; its findings (one per line), or its failure as one finding."""
    result = subprocess.run(
        [str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0 and not lines:
        lines = [f"buf {' '.join(args)} exited with {result.returncode}"]
    return lines if result.returncode != 0 else []


def check(buf: Path, protos: Path = PROTOS, against: Path | None = None) -> Findings:
    """Lint `protos` (a buf module: its buf.yaml) and compare it with
    `against` (default: its released/ directory)."""
    baseline = against or protos / RELEASED
    if not any(baseline.rglob("*.proto")):
        return Findings([], [f"no .proto files in {baseline}: nothing to compare with"])
    lint = _run(buf, ["lint", "."], protos)
    with tempfile.TemporaryDirectory(prefix="dmabufd-released-") as tmp:
        # A copy outside the module (buf refuses an input inside the module
        # it builds), with a buf.yaml of its own so that buf does not look
        # for one in the directories above it.
        copy = Path(tmp) / "api"
        shutil.copytree(baseline, copy, ignore=shutil.ignore_patterns("*.md", "buf.yaml", "buf.lock"))
        (copy / "buf.yaml").write_text("version: v2\n")
        breaking = _run(buf, ["breaking", ".", "--against", str(copy)], protos)
    return Findings(lint, breaking)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protos", type=Path, default=PROTOS, help="the buf module to check (default: protos/)")
    parser.add_argument("--against", type=Path, help="the released API (default: PROTOS/released)")
    args = parser.parse_args(argv)
    try:
        buf = find_buf()
    except BufUnavailable as error:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            print(f"check_buf: FAILED: cannot run buf under CI: {error}", file=sys.stderr)
            return 1
        print(f"check_buf: SKIPPED (buf lint and buf breaking did not run): {error}", file=sys.stderr)
        return 0
    findings = check(buf, args.protos.resolve(), args.against.resolve() if args.against else None)
    for line in findings.lint:
        print(f"lint: {line}")
    for line in findings.breaking:
        print(f"breaking: {line}")
    if findings.ok:
        print(f"check_buf: buf {BUF_VERSION}: lint clean, no breaking change against {RELEASED}/")
        return 0
    print(
        f"check_buf: {len(findings.lint)} lint finding(s), {len(findings.breaking)} breaking change(s) "
        "(protos/buf.yaml says which rules apply and why some are excepted)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
