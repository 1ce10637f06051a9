"""Android's dma_heap.json on real heaps: a daemon given a file that names the CMA heap
("reserved" in our kernel config) for MODEL_WEIGHTS sends model-weights loads and allocations
there, where the same daemon without the file takes the usage route's heaps (system,
udmabuf). Runs inside the VM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import dmabufd_client
from tests.conftest import DaemonFactory
from tests.integration.test_loading import loaded_bytes

CMA = Path("/dev/dma_heap/reserved")


def _sample(path: Path) -> Path:
    path.write_text(
        json.dumps({"devices": {str(CMA): {"npu": [{"device_numbers": [0], "buffer_types": ["MODEL_WEIGHTS"]}]}}})
    )
    return path


def test_model_weights_go_to_the_heap_dma_heap_json_names(
    daemon_factory: DaemonFactory, scratch_dir: Path, tmp_path: Path
) -> None:
    assert CMA.exists(), "the guest kernel has no CMA heap (CONFIG_DMABUF_HEAPS_CMA)"
    weights = scratch_dir / "npu-weights.bin"
    weights.write_bytes(os.urandom(4 << 20))
    routed = daemon_factory(f'[heaps]\ndma_heap_json = "{_sample(tmp_path / "dma_heap.json")}"\n')
    plain = daemon_factory('[heaps]\ndma_heap_json = ""\n', name="plain")

    with routed.connect() as client:
        with client.load_file(weights, verify=True) as loaded:  # usage model-weights by default
            assert {buffer.info.heap for buffer in loaded.buffers} == {"reserved"}
            # the CMA exporter has no direct copy_file_range: the daemon finds out and falls back
            assert loaded.stats.method != "direct-cfr", loaded.stats
        reserved = next(heap for heap in client.heaps() if heap.name == "reserved")
        assert "direct-cfr" not in reserved.load_methods, reserved
        with client.load_file(weights, npu_buffer_type="MODEL_WEIGHTS", npu_device=0) as loaded:
            assert {buffer.info.heap for buffer in loaded.buffers} == {"reserved"}
        with client.allocate("1M", usage="model-weights") as buffer:
            assert buffer.info.heap == "reserved"
        # a type the file does not list keeps its usage route
        with client.allocate("1M", npu_buffer_type="CACHE") as buffer:
            assert buffer.info.heap == "system"
        assert client.npu_routes(), "ListHeaps reports the file's routes"

    with plain.connect() as client, client.load_file(weights) as loaded:
        # the route's fastest heap: system (direct-cfr) patched, udmabuf (direct-read) stock
        assert {buffer.info.heap for buffer in loaded.buffers} <= {"system", "udmabuf"}


def test_direct_copy_into_an_exporter_without_it_is_refused_clearly(
    daemon_factory: DaemonFactory, scratch_dir: Path
) -> None:
    """Named explicitly, the method fails with INVALID_ARGUMENT (the probe's memfd cannot tell this
    exporter apart on the patched kernel: the first load finds out), and the heap still loads by
    the method the daemon picks."""
    assert CMA.exists(), "the guest kernel has no CMA heap (CONFIG_DMABUF_HEAPS_CMA)"
    weights = scratch_dir / "cma-weights.bin"
    data = os.urandom(2 << 20)
    weights.write_bytes(data)
    daemon = daemon_factory()
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.InvalidArgument, match="direct-cfr"):
            client.load_file(weights, heap="reserved", method="direct-cfr")
        assert client.stats().total_buffers == 0, "the failed load left no buffer behind"
        with client.load_file(weights, heap="reserved", verify=True) as loaded:
            assert loaded.stats.method != "direct-cfr"
            assert loaded_bytes(loaded) == data
    assert "Traceback" not in daemon.log(), daemon.log()
