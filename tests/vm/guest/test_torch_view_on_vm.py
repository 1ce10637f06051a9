"""The torch view of models in real dma-bufs: the system heap and udmabuf refuse private
mappings, so the client's views refuse writes (a write into the shared read-only mapping would
be a SIGSEGV). Natively the daemon has memfds only and tests/integration/test_torch_view.py
covers the copy-on-write side. Runs inside the VM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import dmabufd_client


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
def test_dma_buf_model_views_refuse_writes(client: dmabufd_client.Client, tmp_path: Path, heap: str) -> None:
    weights = np.arange(64 * 1024, dtype=np.float32).reshape(256, 256)
    bias = np.linspace(-1.0, 1.0, 256, dtype=np.float16)
    path = tmp_path / "m.safetensors"
    save_file({"head.weight": weights, "head.bias": bias}, str(path))

    with client.load_model(path, heap=heap) as model:
        assert model.torch_writes == "refuse"
        view = model.torch("head.weight")
        assert view.dtype == torch.float32
        assert not view.requires_grad
        assert torch.equal(view, torch.from_numpy(weights))
        state = model.state_dict(prefix="head.")
        assert set(state) == {"weight", "bias"}
        assert torch.equal(state["bias"], torch.from_numpy(bias))
        with pytest.raises(RuntimeError, match="Cannot access data pointer"):
            view.add_(1.0)
        with pytest.raises(ValueError, match="needs a memfd model"):
            model.torch("head.weight", writes="private")
        # a conversion is a copy: ordinary, writable memory
        copy = view.half()
        copy.add_(1.0)
        assert torch.equal(view, torch.from_numpy(weights)), "the buffer is untouched"
