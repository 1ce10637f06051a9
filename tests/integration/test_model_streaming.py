"""Streamed LoadModel against a real daemon: tensors usable as their bytes
land (and never before), the same bytes as safetensors' own loader, a
cancelled or failed stream that leaves nothing booked or charged, a second
client that gets the model whole once the first load completes, and the
time to the first tensor."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dmabufd_client
from dmabufd_client import Model
from dmabufd_common import uapi
from dmabufd_common.api.v1 import dmabufd_pb2 as pb
from tests.conftest import DaemonFactory, RunningDaemon, run_as_rootless_client

# One I/O lane of 1 MiB chunks through the page cache: a load of a few
# hundred MiB then takes long enough (0.3 s for 512 MiB) to act on right
# after its first message; within each of its buffers, chunks land in file
# order (a buffered-read model bound for memfds comes in buffers of about
# 128 MiB, which the lane takes in turn: loading/transfer.py, lane_order).
SLOW = '[loading]\nparallelism = 1\nchunk_bytes = "1M"\n'
# Several lanes, small chunks: chunks land out of order, several in flight.
PARALLEL = '[loading]\nparallelism = 4\nchunk_bytes = "1M"\n'

ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}


def write_model(path: Path, megabytes: int, seed: int = 0) -> list[str]:
    """A safetensors file of about `megabytes` MiB laid out as a small
    transformer (F32 norms, BF16 attention, F16 MLP), plus an I64 tensor
    and a zero-size one; its bytes are random, so any shift or stale byte
    shows. Written by hand: numpy has no bfloat16. Returns the names in
    file order."""
    width = 256
    specs: list[tuple[str, str, tuple[int, ...]]] = [("model.embed.weight", "BF16", (2048, width))]
    layer = 0
    total = 2048 * width * 2
    while total < megabytes << 20:
        prefix = f"model.layers.{layer}"
        specs += [
            (f"{prefix}.norm.weight", "F32", (width,)),
            (f"{prefix}.attn.q.weight", "BF16", (width, width)),
            (f"{prefix}.attn.kv.weight", "BF16", (width // 2, width)),
            (f"{prefix}.mlp.up.weight", "F16", (4 * width, width)),
            (f"{prefix}.mlp.down.weight", "F16", (width, 4 * width)),
        ]
        total += width * 4 + (width * width + width * width // 2) * 2 + 2 * 4 * width * width * 2
        layer += 1
    specs += [("model.steps", "I64", (10,)), ("model.empty", "F32", (0, 4)), ("lm_head.weight", "F16", (1000, width))]
    header: dict[str, object] = {"__metadata__": {"seed": str(seed)}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape)) * ITEM_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    block = np.random.default_rng(seed).bytes(1 << 20)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        written = 0
        while written < offset:
            # Each MiB starts somewhere else in the block: no two MiB alike.
            start = (written >> 20) * 7919 % len(block)
            piece = (block[start:] + block[:start])[: offset - written]
            out.write(piece)
            written += len(piece)
    return [name for name, _, _ in specs]


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def settle(daemon: RunningDaemon, client: dmabufd_client.Client, baseline: int) -> None:
    """Nothing booked, charged, lingering or resident, and the daemon's fds
    back to `baseline` (a cancelled load's buffers that the client still
    held when it failed linger until the reaper sees them closed)."""
    deadline = time.monotonic() + 10
    while True:
        stats = client.stats()
        mine = next(c for c in stats.clients if c.session_id == client.session_id)
        clean = (stats.total_bytes, stats.models, stats.lingering_buffers, mine.charged_bytes) == (0, 0, 0, 0)
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (stats.total_bytes, stats.models, stats.lingering_buffers) == (0, 0, 0)
    assert (mine.charged_bytes, mine.charged_buffers) == (0, 0), "the uid is charged for nothing"
    assert daemon.wait_for_fd_count(baseline) == baseline, "no fd leaked"


@pytest.fixture
def slow(daemon_factory: DaemonFactory) -> RunningDaemon:
    return daemon_factory(SLOW)


def baseline_of(daemon: RunningDaemon, client: dmabufd_client.Client) -> int:
    client.heaps()  # the gRPC connection opens at the first call
    return daemon.settled_fd_count()


def test_each_tensor_is_right_when_it_is_reported_ready(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory(PARALLEL)
    path = tmp_path / "m.safetensors"
    names = write_model(path, 128, seed=1)
    reference = {name: raw(tensor) for name, tensor in load_file(str(path)).items()}
    with daemon.connect() as client, client.load_model(path, stream=True) as model:
        assert not model.complete, "the model came back before its bytes were all in"
        assert list(model) == names
        # Checked at the moment each is reported: its bytes must be in already.
        seen = []
        for name in model.as_ready(timeout=30):
            assert model.is_ready(name)
            assert model[name].tobytes() == reference[name], f"{name} was reported ready before its bytes landed"
            seen.append(name)
        assert sorted(seen) == sorted(names), "every tensor once"
        model.wait_all(timeout=30)
        assert model.complete
        assert model.ready_fraction == 1.0
        assert model.error is None
        assert not model.shared
        assert model.read_only_enforced
        assert model.metadata == {"seed": "1"}
        for name in names:  # and still right once the load is over
            assert model[name].tobytes() == reference[name]
        assert model["model.steps"].dtype == np.int64
        assert model["model.empty"].shape == (0, 4)
        assert model.torch("model.embed.weight").dtype is torch.bfloat16
        assert raw(model.torch("model.embed.weight")) == reference["model.embed.weight"]
        stats = model.stats
        with open(path, "rb") as file:
            (header_bytes,) = struct.unpack("<Q", file.read(8))
        assert stats.bytes == path.stat().st_size - 8 - header_bytes, "every tensor byte, read once"
        assert stats.first_tensor_seconds > 0


def test_the_stream_reports_every_tensor_exactly_once(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """The wire itself, below the client library (which would hide a
    duplicate): one opening message with the model, then tensors_ready,
    the result last, every index exactly once."""
    daemon = daemon_factory(PARALLEL)
    path = tmp_path / "m.safetensors"
    names = write_model(path, 64, seed=11)
    with daemon.connect() as client:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ticket = client._fds.new_ticket(fd)
            request = pb.LoadModelRequest(source=pb.FileSource(fd=True), stream=True)
            messages = list(client._stub.LoadModel(request, metadata=client._metadata(ticket)))
        finally:
            os.close(fd)
        result = messages[-1].result
        for _, buffer_fd in client._fds.take(ticket, len(result.buffers)):
            os.close(buffer_fd)
        described = [index for index, message in enumerate(messages) if message.HasField("model")]
        assert described == [0], "the model is described once, first"
        assert [message.HasField("result") for message in messages].count(True) == 1
        assert messages[-1].HasField("result")
        assert [tensor.name for tensor in messages[0].model.tensors] == names
        assert not messages[0].model.shared
        indexes = [index for message in messages for index in message.tensors_ready]
        assert sorted(indexes) == list(range(len(names))), "every tensor exactly once"
        done = [message.bytes_done for message in messages]
        assert done == sorted(done), "bytes_done never goes back"
        assert 0 < result.first_tensor_seconds <= result.wall_seconds
        client._release_model(messages[0].model.model_id)


def test_a_stalled_streaming_client_blocks_nobody(slow: RunningDaemon, tmp_path: Path) -> None:
    """A client that reads the first message and then nothing more, on
    either socket, while others load; once it dies nothing of it stays."""
    stalled_path, other_path = tmp_path / "stalled.safetensors", tmp_path / "other.safetensors"
    write_model(stalled_path, 512, seed=12)
    names = write_model(other_path, 16, seed=13)
    script = (
        "import os, sys, time, dmabufd_client\n"
        "from dmabufd_common.api.v1 import dmabufd_pb2 as pb\n"
        f"c = dmabufd_client.connect({str(slow.runtime_dir)!r})\n"
        f"fd = os.open({str(stalled_path)!r}, os.O_RDONLY)\n"
        "ticket = c._fds.new_ticket(fd)\n"
        "method = pb.LOAD_METHOD_BUFFERED_READ\n"
        "request = pb.LoadModelRequest(source=pb.FileSource(fd=True), stream=True, method=method)\n"
        "first = next(iter(c._stub.LoadModel(request, metadata=c._metadata(ticket))))\n"
        "print(c.session_id, first.HasField('model'), flush=True)\n"
        "time.sleep(600)\n"
    )
    with slow.connect() as observer, slow.connect() as other:
        stalled = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        try:
            assert stalled.stdout is not None
            session_id, described = stalled.stdout.readline().split()
            assert described == "True"
            started = time.monotonic()
            with other.load_model(other_path, stream=True) as model:
                model.wait_all(timeout=30)
                reference = load_file(str(other_path))
                assert model["lm_head.weight"].tobytes() == raw(reference["lm_head.weight"])
                assert sorted(model.as_ready(timeout=5)) == sorted(names)
            assert time.monotonic() - started < 10, "served while the other stream stalls"
            sessions = {c.session_id for c in observer.stats().clients}
            assert int(session_id) in sessions, "the stalled client is still connected"
        finally:
            stalled.kill()
            stalled.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = observer.stats()
            if int(session_id) not in {c.session_id for c in stats.clients} and not stats.lingering_buffers:
                break
            time.sleep(0.1)
        assert int(session_id) not in {c.session_id for c in stats.clients}
        assert stats.lingering_buffers == 0
        mine = next(c for c in stats.clients if c.session_id == observer.session_id)
        assert mine.charged_bytes == 0
        # Whatever became of its load, the model is right for the next client.
        with observer.load_model(stalled_path) as model:
            assert model["lm_head.weight"].tobytes() == raw(load_file(str(stalled_path))["lm_head.weight"])


def test_a_streamed_model_without_tensor_bytes(daemon: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    header = json.dumps(
        {"__metadata__": {"kind": "empty"}, "nothing": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}
    ).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with daemon.connect() as client, client.load_model(path, stream=True) as model:
        model.wait_all(timeout=30)
        assert list(model.as_ready(timeout=5)) == ["nothing"]
        assert model["nothing"].shape == (0, 3)
        assert model.metadata == {"kind": "empty"}
        stats = model.stats
        assert stats.bytes == 0
        assert stats.first_tensor_seconds == stats.wall_seconds, "nothing lands: the whole load"


def test_one_lane_makes_tensors_ready_in_file_order(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    names = write_model(path, 64, seed=2)
    with slow.connect() as client, client.load_model(path, stream=True, method="buffered-read") as model:
        order = list(model.as_ready(timeout=30))
        assert model.stats.parallelism == 1
    # Zero-size tensors hold nothing to wait for: they are ready at once.
    empty = [name for name in names if model.tensors[name].nbytes == 0]
    assert order == empty + [name for name in names if name not in empty]


def test_closing_mid_stream_cancels_and_frees_everything(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_model(path, 512, seed=3)
    with slow.connect() as client:
        baseline = baseline_of(slow, client)
        model = client.load_model(path, stream=True, method="buffered-read")
        first = next(model.as_ready(timeout=30))
        assert not model.complete
        array = model[first]
        assert array.nbytes == model.tensors[first].nbytes
        del array
        model.close()
        assert model.released
        assert not model.complete
        assert isinstance(model.error, dmabufd_client.DmabufdError)
        assert model.error.status is grpc.StatusCode.CANCELLED
        with pytest.raises(dmabufd_client.DmabufdError):
            model.wait_all()
        settle(slow, client, baseline)
        # The same model loads afresh: nothing of the cancelled one stayed.
        with client.load_model(path) as again:
            assert not again.shared


def test_a_client_that_dies_mid_stream_leaves_nothing(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_model(path, 512, seed=4)
    with slow.connect() as observer:
        baseline = baseline_of(slow, observer)
        script = (
            "import os, sys, dmabufd_client\n"
            f"c = dmabufd_client.connect({str(slow.runtime_dir)!r})\n"
            f"m = c.load_model({str(path)!r}, stream=True, method='buffered-read')\n"
            "print(m.complete, flush=True)\n"
            "os._exit(0)\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "False", "it died with the load still running"
        settle(slow, observer, baseline)
        # And the daemon goes on serving: the same file loads afresh.
        with observer.load_model(path) as model:
            assert not model.shared
            assert model.complete


def test_a_file_truncated_mid_stream_fails_clearly_and_frees_everything(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    # 1 GiB: this acts on the first progress report, PROGRESS_INTERVAL_S
    # (0.25 s) after the load starts, and 512 MiB took 0.3 s in all.
    write_model(path, 1024, seed=5)
    truncated = threading.Event()

    def truncate_midway(done: int, total: int) -> None:
        if 0 < done < total and not truncated.is_set():
            os.truncate(path, 1 << 20)
            truncated.set()

    with slow.connect() as client:
        baseline = baseline_of(slow, client)
        model = client.load_model(path, stream=True, method="buffered-read", progress=truncate_midway)
        with pytest.raises(dmabufd_client.FileChanged, match="truncated") as caught:
            model.wait_all(timeout=30)
        assert truncated.is_set()
        assert caught.value.status is grpc.StatusCode.FAILED_PRECONDITION
        assert model.error is caught.value
        assert not model.complete
        last = list(model)[-1]
        with pytest.raises(dmabufd_client.FileChanged):
            model.wait(last, timeout=5)
        with pytest.raises(dmabufd_client.FileChanged):
            list(model.as_ready(timeout=5))
        assert model.released, "a failed stream closes its model"
        settle(slow, client, baseline)


def test_a_second_client_gets_the_model_whole_when_the_first_finishes(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    names = write_model(path, 512, seed=6)
    with slow.connect() as first, slow.connect() as second, slow.connect() as observer:
        streamed = first.load_model(path, stream=True, method="buffered-read")
        assert not streamed.complete
        assert observer.stats().models == 0, "resident only once the load completed"
        # This call waits for the first one's load, then shares it.
        shared = second.load_model(path, stream=True)
        assert observer.stats().models == 1
        assert shared.shared
        assert shared.complete
        assert shared.stats.bytes == 0, "nothing was read for the second client"
        assert shared.ready_fraction == 1.0
        assert list(shared.as_ready()) == names
        streamed.wait_all(timeout=30)
        assert not streamed.shared
        for name in names:
            assert shared[name].tobytes() == streamed[name].tobytes()
        reference = load_file(str(path))
        assert shared["lm_head.weight"].tobytes() == raw(reference["lm_head.weight"])
        shared.close()
        streamed.close()
        assert observer.stats().models == 1, "it stays resident for the next client"


def test_a_client_waiting_for_a_cancelled_stream_loads_the_model_itself(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    names = write_model(path, 512, seed=14)
    with slow.connect() as first, slow.connect() as second:
        streamed = first.load_model(path, stream=True, method="buffered-read")
        assert not streamed.complete
        waited: list[Model] = []
        failed: list[BaseException] = []

        def load() -> None:
            try:
                waited.append(second.load_model(path, method="buffered-read"))
            except BaseException as error:  # the assertion below says what it was
                failed.append(error)

        waiter = threading.Thread(target=load)
        waiter.start()
        time.sleep(0.1)  # it asks while the first load runs, and waits for it
        streamed.close()  # cancels the first load
        waiter.join(timeout=60)
        assert not failed, failed
        (model,) = waited
        with model:
            assert model.complete
            assert not model.shared, "the cancelled load left nothing to share"
            assert list(model) == names
            assert model["lm_head.weight"].tobytes() == raw(load_file(str(path))["lm_head.weight"])
        assert isinstance(streamed.error, dmabufd_client.DmabufdError)


def test_first_tensor_seconds(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_model(path, 512, seed=7)
    with slow.connect() as client:
        started = time.monotonic()
        with client.load_model(path, stream=True, method="buffered-read") as model:
            model.wait_all(timeout=60)
            whole = time.monotonic() - started
            stats = model.stats
        assert 0 < stats.first_tensor_seconds < stats.wall_seconds < whole
        assert stats.first_tensor_seconds < stats.wall_seconds / 2, "the first tensor lands long before the last"
        # Not streamed: measured all the same, when the first tensor landed.
        os.utime(path, ns=(1, 1))  # a new file to the daemon
        with client.load_model(path, method="buffered-read") as model:
            stats = model.stats
        assert not model.shared
        assert 0 < stats.first_tensor_seconds < stats.wall_seconds / 2
        # Shared: the whole model is usable once attached.
        with client.load_model(path) as again:
            assert again.shared
            assert again.stats.first_tensor_seconds == again.stats.wall_seconds > 0


def _held_fds(model: Model) -> list[int]:
    """The model's buffers' fds (a model of more than 128 MiB bound for
    memfds comes in several: loading/models.py, part_bytes)."""
    return list(model._fds.values())


def test_streamed_memfd_is_read_only_for_clients_before_it_is_sealed(slow: RunningDaemon, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_model(path, 512, seed=8)
    with slow.connect() as client, client.load_model(path, stream=True, method="buffered-read") as model:
        fds = _held_fds(model)
        assert not model.complete
        assert len(fds) > 1
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            assert not os.fstat(fd).st_mode & (stat.S_IWGRP | stat.S_IWOTH), "no other uid may reopen it to write"
        model.wait_all(timeout=30)
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & uapi.F_SEAL_WRITE


def test_a_streamed_load_is_complete_only_once_its_call_is_over(
    slow: RunningDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model says complete only after the call has been read to its
    end. Before, it said so on the result message, with the call's end
    still to come: a caller that exited right then could hang at
    interpreter exit, in gRPC's collection of the half-read call (the
    next test)."""
    path = tmp_path / "m.safetensors"
    write_model(path, 128, seed=12)
    with slow.connect() as client:
        calls: list[Any] = []  # grpc's call objects: a Future and an iterator
        load_model = client._stub.LoadModel

        def capture(*args: Any, **kwargs: Any) -> Any:
            call = load_model(*args, **kwargs)
            calls.append(call)
            return call

        monkeypatch.setattr(client._stub, "LoadModel", capture)
        with client.load_model(path, stream=True, method="buffered-read") as model:
            assert not model.complete
            model.wait_all(timeout=30)
            (call,) = calls
            assert call.done(), "the model was announced complete before its call ended"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_a_client_that_exits_right_after_a_streamed_load_exits(daemon_factory: DaemonFactory) -> None:
    """A script that streams a model, waits for it and exits without closing
    it must exit. It used to hang at interpreter exit in 3 runs of 15 (as
    another uid, whose loads the daemon does not tell what is cached).
    Each run loads a model of its own: one loaded before stays resident
    and would come whole, without the streamed path."""
    daemon = daemon_factory(SLOW, public=True)
    with tempfile.TemporaryDirectory(prefix="dmabufd-stream-") as directory:
        os.chmod(directory, 0o755)
        for run in range(10):
            path = Path(directory) / f"m{run}.safetensors"
            write_model(path, 128, seed=20 + run)
            path.chmod(0o644)
            body = (
                f"m = c.load_model({str(path)!r}, stream=True, method='buffered-read')\n"
                "print('streamed' if not m.complete else 'whole', flush=True)\n"
                "m.wait_all(timeout=20)\nprint('loaded', flush=True)\n"
            )
            try:
                done = run_as_rootless_client(daemon, body, timeout_s=40)
            except subprocess.TimeoutExpired as hung:
                pytest.fail(f"the client did not exit; it printed {hung.stdout!r}")
            assert done.returncode == 0, done.stderr
            assert done.stdout.split() == ["streamed", "loaded"], done.stdout
            path.unlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_cannot_reopen_a_streamed_model_for_writing(daemon_factory: DaemonFactory) -> None:
    daemon = daemon_factory(SLOW, public=True)
    with tempfile.TemporaryDirectory(prefix="dmabufd-stream-") as directory:
        os.chmod(directory, 0o755)
        path = Path(directory) / "m.safetensors"
        write_model(path, 512, seed=9)
        path.chmod(0o644)
        result = run_as_rootless_client(
            daemon,
            f"m = c.load_model({str(path)!r}, stream=True, method='buffered-read')\n"
            "print('streaming' if not m.complete else 'complete')\n"
            "for fd in m._fds.values():\n"
            "    try:\n"
            "        os.open(f'/proc/self/fd/{fd}', os.O_RDWR)\n"
            "        print('reopened')\n"
            "    except PermissionError:\n"
            "        print('denied')\n"
            "m.wait_all(timeout=30)\n",
        )
    assert result.returncode == 0, result.stderr
    streaming, *reopens = result.stdout.split()
    assert streaming == "streaming", result.stdout + result.stderr
    assert len(reopens) > 1, result.stdout
    assert set(reopens) == {"denied"}, result.stdout + result.stderr


@pytest.fixture
def resident(daemon: RunningDaemon, tmp_path: Path) -> Iterator[tuple[Path, Model]]:
    path = tmp_path / "m.safetensors"
    write_model(path, 16, seed=10)
    with daemon.connect() as client, client.load_model(path) as model:
        yield path, model


def test_a_resident_model_comes_whole_when_streamed(daemon: RunningDaemon, resident: tuple[Path, Model]) -> None:
    path, held = resident
    with daemon.connect() as client, client.load_model(path, stream=True) as model:
        assert model.shared
        assert model.complete
        assert len(list(model.as_ready())) == len(held)
        assert model.wait("lm_head.weight").tobytes() == held["lm_head.weight"].tobytes()
        assert model.stats.first_tensor_seconds > 0
    with pytest.raises(KeyError):
        held.wait("no such tensor")
