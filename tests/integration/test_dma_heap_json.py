"""Android's dma_heap.json routing NPU buffers, in a real daemon.

What this machine offers is the memfd heap only, so the heaps the test's
dma_heap.json names are played by stand-ins, and each assertion says which
route a request took by where it succeeds or fails:

- npu0-weights (NPU 0's weights) is an alias of memfd: the one heap here
  that allocates. A request that lands there reports heap "memfd".
- npu1-weights (NPU 1's weights) is a device node that is /dev/null: the
  daemon sees a DMA heap, which fails every allocation with an error that
  names it. A request routed there fails naming "npu1-weights".
- system is such a node too, and the config's own route for model-weights
  is ["system"]: a model-weights request that did not go by the file would
  fail naming "system" (the control daemon shows it does).
- npu-cache-carveout is named by the file but absent: skipped, with one
  warning at start-up, so NPU cache buffers take npu-cache's own route
  (memfd).

Nothing here proves that a real NPU heap's buffers reach an NPU; the VM
suite runs real heaps. It proves the daemon reads the file and routes by it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import dmabufd_client
from dmabufd_client import NpuRoute
from tests.conftest import DaemonFactory, RunningDaemon

DMA_HEAP_JSON = {
    "devices": {
        "/dev/dma_heap/npu0-weights": {
            "npu": [{"device_numbers": [0], "buffer_types": ["MODEL_WEIGHTS", "MODEL_EXECUTABLE"]}]
        },
        "/dev/dma_heap/npu1-weights": {"npu": [{"deviceNumbers": [1], "bufferTypes": [2]}]},
        "/dev/dma_heap/npu-cache-carveout": {"npu": [{"device_numbers": [0], "buffer_types": ["CACHE"]}]},
    }
}


def config(tmp_path: Path, dma_heap_json: str) -> str:
    dev = tmp_path / "dev"
    (dev / "dma_heap").mkdir(parents=True, exist_ok=True)
    for name in ("system", "npu1-weights"):
        if not (dev / "dma_heap" / name).exists():
            (dev / "dma_heap" / name).symlink_to("/dev/null")
    return (
        f'[discovery]\nsource = "scan"\ndev_root = "{dev}"\n'
        f'[heaps]\ndma_heap_json = "{dma_heap_json}"\n'
        '[heaps.aliases]\nnpu0-weights = ["memfd"]\n'
        '[usage]\nmodel-weights = ["system"]\nnpu-cache = ["memfd"]\n'
    )


@pytest.fixture
def npu_daemon(daemon_factory: DaemonFactory, tmp_path: Path) -> RunningDaemon:
    path = tmp_path / "dma_heap.json"
    path.write_text(json.dumps(DMA_HEAP_JSON))
    return daemon_factory(config(tmp_path, str(path)), name="npu")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(256 << 10))
    return path


def test_model_weights_go_where_the_file_says(npu_daemon: RunningDaemon, weights: Path) -> None:
    with npu_daemon.connect() as client:
        with client.load_file(weights, usage="model-weights") as loaded:
            assert {b.info.heap for b in loaded.buffers} == {"memfd"}, "npu0-weights (memfd), not the route's system"
            assert {b.info.usage for b in loaded.buffers} == {"model-weights"}
        with client.load_file(weights, npu_buffer_type="MODEL_WEIGHTS", npu_device=0) as loaded:
            assert {b.info.heap for b in loaded.buffers} == {"memfd"}
            assert {b.info.usage for b in loaded.buffers} == {"model-weights"}
        with client.load_file(weights) as loaded:  # the client's default usage is model-weights
            assert {b.info.heap for b in loaded.buffers} == {"memfd"}
        with pytest.raises(dmabufd_client.Unavailable, match="heap 'npu1-weights' failed to allocate"):
            client.load_file(weights, npu_buffer_type="MODEL_WEIGHTS", npu_device=1)
        with client.allocate(4096, npu_buffer_type="model_executable", npu_device=0) as buffer:
            assert (buffer.info.heap, buffer.info.usage) == ("memfd", "model-executable")
        assert client.buffers() == []


def test_load_model_goes_where_the_file_says(npu_daemon: RunningDaemon, tmp_path: Path) -> None:
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, len(data)]}}).encode()
    model_path = tmp_path / "model.safetensors"
    model_path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    with npu_daemon.connect() as client:
        with client.load_model(model_path, npu_buffer_type="MODEL_WEIGHTS", npu_device=0) as model:
            assert model["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]  # system would have failed
        with pytest.raises(dmabufd_client.Unavailable, match="heap 'npu1-weights' failed to allocate"):
            client.load_model(model_path, npu_device=1)  # LoadModel's usage: model-weights


def test_an_absent_heap_falls_back_to_the_usage_route(npu_daemon: RunningDaemon) -> None:
    log = npu_daemon.log()
    assert log.count("names heap(s) not present here: npu-cache-carveout;") == 1, log
    with npu_daemon.connect() as client, client.allocate(4096, npu_buffer_type="CACHE", npu_device=0) as buffer:
        assert (buffer.info.heap, buffer.info.usage) == ("memfd", "npu-cache")


def test_contradictions_are_invalid(npu_daemon: RunningDaemon) -> None:
    with npu_daemon.connect() as client:
        with pytest.raises(dmabufd_client.InvalidArgument, match="usage 'camera' contradicts npu_buffer_type CACHE"):
            client.allocate(4096, usage="camera", npu_buffer_type="CACHE")
        with pytest.raises(dmabufd_client.InvalidArgument, match="npu_device needs an NPU buffer type"):
            client.allocate(4096, npu_device=0)
        with pytest.raises(dmabufd_client.InvalidArgument, match="unknown NPU buffer type 'WEIGHTS'"):
            client.allocate(4096, npu_buffer_type="WEIGHTS")


def test_heaps_lists_the_files_routes(npu_daemon: RunningDaemon, tmp_path: Path) -> None:
    with npu_daemon.connect() as client:
        routing = client.npu_routes()
    assert routing.source == str(tmp_path / "dma_heap.json")
    assert routing.routes == (
        NpuRoute("MODEL_EXECUTABLE", 0, "model-executable", ("npu0-weights",)),
        NpuRoute("MODEL_WEIGHTS", 0, "model-weights", ("npu0-weights",)),
        NpuRoute("MODEL_WEIGHTS", 1, "model-weights", ("npu1-weights",)),
        NpuRoute("CACHE", 0, "npu-cache", ("npu-cache-carveout",)),
    )
    ctl = [sys.executable, "-m", "dmabufd_client.ctl", "--runtime-dir", str(npu_daemon.runtime_dir)]
    listed = subprocess.run([*ctl, "--json", "heaps"], capture_output=True, text=True, timeout=60, check=True)
    shown = json.loads(listed.stdout)
    assert shown["dma_heap_json"] == routing.source
    assert shown["npu_routes"][2] == {
        "buffer_type": "MODEL_WEIGHTS",
        "npu_device": 1,
        "usage": "model-weights",
        "heap_order": ["npu1-weights"],
    }
    table = subprocess.run([*ctl, "heaps"], capture_output=True, text=True, timeout=60, check=True)
    assert "NPU routes from" in table.stdout
    assert "npu-cache-carveout" in table.stdout


def test_dmabufctl_options(npu_daemon: RunningDaemon, weights: Path) -> None:
    ctl = [sys.executable, "-m", "dmabufd_client.ctl", "--runtime-dir", str(npu_daemon.runtime_dir), "--json"]
    loaded = subprocess.run(
        [*ctl, "load", str(weights), "--npu-buffer-type", "MODEL_WEIGHTS", "--npu-device", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert {b["heap"] for b in json.loads(loaded.stdout)["buffers"]} == {"memfd"}
    failed = subprocess.run(
        [*ctl, "alloc", "--size", "4K", "--npu-buffer-type", "model_weights", "--npu-device", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 3, failed.stderr  # UNAVAILABLE: npu1-weights cannot allocate
    assert "npu1-weights" in failed.stderr


def test_without_the_file_the_same_request_takes_the_config_route(
    daemon_factory: DaemonFactory, tmp_path: Path, weights: Path
) -> None:
    """The control: the same config with the file turned off sends the
    very same load to system, proving the file is what routed it above."""
    daemon = daemon_factory(config(tmp_path, ""), name="control")
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.Unavailable, match="heap 'system' failed to allocate"):
            client.load_file(weights, npu_buffer_type="MODEL_WEIGHTS", npu_device=0)
        assert client.npu_routes().routes == ()


def test_a_malformed_file_stops_the_daemon_naming_the_key(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    path = tmp_path / "dma_heap.json"
    broken = json.loads(json.dumps(DMA_HEAP_JSON))
    broken["devices"]["/dev/dma_heap/npu1-weights"]["npu"][0]["deviceNumbers"] = [1, -1]
    path.write_text(json.dumps(broken))
    with pytest.raises(RuntimeError) as caught:
        daemon_factory(config(tmp_path, str(path)), name="malformed")
    message = str(caught.value)
    assert "dmabufd exited with 2" in message, message
    assert (
        f'heaps.dma_heap_json: {path}: devices["/dev/dma_heap/npu1-weights"].npu[0].deviceNumbers[1]: '
        "expected a non-negative integer"
    ) in message, message
