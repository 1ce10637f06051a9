from __future__ import annotations

import pytest

from dmabufd.api.naming import MAX_LABEL_BYTES, kernel_name
from dmabufd.errors import InvalidRequest
from dmabufd_common.uapi import DMA_BUF_NAME_LEN


def test_kernel_name_fits_the_kernel_limit_for_any_pid() -> None:
    name = kernel_name(4194304, "x" * MAX_LABEL_BYTES, "buffer")
    assert name == "4194304:" + "x" * MAX_LABEL_BYTES
    assert len(name.encode()) <= DMA_BUF_NAME_LEN - 1


def test_empty_label_uses_the_fallback() -> None:
    assert kernel_name(12, "", "model-weights") == "12:model-weights"


@pytest.mark.parametrize("label", ["a" * 24, "nul\x00", "new\nline", "sp ace", "ünï"])
def test_bad_labels(label: str) -> None:
    with pytest.raises(InvalidRequest):
        kernel_name(1, label, "x")
