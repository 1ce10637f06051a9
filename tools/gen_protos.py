#!/usr/bin/env python3
"""Generate the Python gRPC code and typed stubs from protos/.

The generated modules are committed (so an install needs no code generator)
and tests/unit/test_generated_code.py fails when they are stale. Run
`make protos` after editing a .proto file.

The .proto is compiled from a temporary tree that places it at the import
path the generated code must live at (dmabufd_common/api/v1/), so the
generated imports resolve without rewriting and never collide with the
daemon's own `dmabufd` package.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_SOURCES = {
    REPO / "protos/dmabufd/v1/dmabufd.proto": "dmabufd_common/api/v1/dmabufd.proto",
}
OUTPUT_ROOT = REPO / "common"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Compile every proto into out_root; return the files written."""
    from grpc_tools import protoc  # imported here: only a dev dependency

    # protoc finds the mypy plugins on PATH; they sit beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        for source, import_path in PROTO_SOURCES.items():
            staged = tmp_root / import_path
            staged.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staged)
            args = [
                "protoc",
                f"-I{tmp_root}",
                f"--python_out={out_root}",
                f"--grpc_python_out={out_root}",
                f"--mypy_out={out_root}",
                f"--mypy_grpc_out={out_root}",
                str(staged),
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed for {source}")
            stem = Path(import_path).with_suffix("")
            written += [out_root / f"{stem}{suffix}" for suffix in GENERATED_SUFFIXES]
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUTPUT_ROOT):
            print(f"wrote {path.relative_to(REPO)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            fresh.relative_to(tmp)
            for fresh in generate(Path(tmp))
            if not (OUTPUT_ROOT / fresh.relative_to(tmp)).exists()
            or not filecmp.cmp(fresh, OUTPUT_ROOT / fresh.relative_to(tmp), shallow=False)
        ]
    for path in stale:
        print(f"stale: common/{path} (run `make protos`)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
