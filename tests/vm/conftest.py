"""VM tests: host-side tests boot the product's kernel; guest/ runs only inside that VM.

A normal host `pytest tests` never collects tests/vm/guest (they need /dev/dma_heap and
/dev/udmabuf); inside the VM (env DMABUFD_IN_VM=1, set by tools/vm/dmabufd_vm.py) the host-side
tests are not collected instead, so the guest never tries to boot a VM of its own.
"""

from __future__ import annotations

import os

import pytest

IN_VM = os.environ.get("DMABUFD_IN_VM") == "1"

collect_ignore: list[str] = ["test_vm_suite.py", "test_vm_harness.py"] if IN_VM else ["guest"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots the product's kernel under QEMU (slow; needs qemu and a kernel)")
