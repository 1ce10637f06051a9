"""Fixtures for tests that run inside the dmabufd VM (see tools/vm/README.md)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# the repo root, so guest tests import tests.vm.guest.dmabufd_vm_uapi whatever the import mode
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

IN_VM = os.environ.get("DMABUFD_IN_VM") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_VM:
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="guest test: runs only inside the dmabufd VM (DMABUFD_IN_VM=1)")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vm_variant() -> str:
    return os.environ.get("DMABUFD_VM_VARIANT", "unknown")


@pytest.fixture(scope="session")
def patched(vm_variant: str) -> bool:
    return vm_variant == "patched"


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    base = Path(os.environ.get("DMABUFD_VM_SCRATCH", "/mnt/scratch"))
    if not base.is_dir():
        pytest.fail(f"scratch dir {base} missing (DMABUFD_VM_SCRATCH)")
    d = base / f"guest-tests-{os.getpid()}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)
