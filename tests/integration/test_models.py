"""LoadModel: one resident copy shared by clients, read-only where the
kernel can enforce it, evicted under the budget; hostile files refused."""

from __future__ import annotations

import fcntl
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dmabufd_client
from dmabufd_common import uapi
from tests.conftest import DaemonFactory, RunningDaemon, run_as_rootless_client


def make_model(path: Path, seed: int, megabytes: int = 1) -> dict[str, Any]:
    """A model of about `megabytes` MiB with tensors of several dtypes."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, Any] = {
        "embed.weight": rng.standard_normal((megabytes * 4096, 128)).astype(np.float16),
        "layer.0.bias": rng.standard_normal(3).astype(np.float32),
        "layer.0.weight": rng.standard_normal((7, 5)).astype(np.float64),
        "steps": np.arange(10, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }
    save_file(tensors, str(path), metadata={"seed": str(seed)})
    return tensors


def test_tensors_equal_the_reference_loader(client: dmabufd_client.Client, tmp_path: Path) -> None:
    make_model(tmp_path / "m.safetensors", 1)
    reference = load_file(str(tmp_path / "m.safetensors"))
    with client.load_model(tmp_path / "m.safetensors", verify=True) as model:
        assert set(model) == set(reference)
        for name, expected in reference.items():
            got = model[name]
            assert got.dtype == expected.dtype
            assert got.shape == expected.shape
            assert got.tobytes() == expected.tobytes()
            assert not got.flags.writeable
        assert model.metadata == {"seed": "1"}
        assert model.stats.verified
        assert not model.shared
        assert model.read_only_enforced, "memfd models are sealed"


def test_second_client_shares_the_resident_model(daemon: RunningDaemon, tmp_path: Path) -> None:
    make_model(tmp_path / "m.safetensors", 2)
    with daemon.connect() as first, daemon.connect() as second:
        one = first.load_model(tmp_path / "m.safetensors")
        two = second.load_model(tmp_path / "m.safetensors", verify=True)
        assert (one.shared, two.shared) == (False, True)
        assert two.stats.bytes == 0, "nothing was read for the second client"
        assert two.stats.verified
        assert np.array_equal(one["embed.weight"], two["embed.weight"])
        assert first.stats().models == 1
        one.close()
        two.close()
        assert first.stats().models == 1, "it stays resident for the next client"


def test_nobody_can_write_a_shared_memfd_model(client: dmabufd_client.Client, tmp_path: Path) -> None:
    make_model(tmp_path / "m.safetensors", 3)
    with client.load_model(tmp_path / "m.safetensors") as model:
        (fd,) = model._fds.values()
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & (uapi.F_SEAL_WRITE | uapi.F_SEAL_FUTURE_WRITE)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # even a reopened read-write fd
        try:
            with pytest.raises(PermissionError):
                os.pwrite(writable, b"x", 0)
        finally:
            os.close(writable)
        with pytest.raises(ValueError, match="read-only"):
            model["steps"][0] = 1


def test_changed_file_is_a_different_model(client: dmabufd_client.Client, tmp_path: Path) -> None:
    make_model(tmp_path / "m.safetensors", 4)
    with client.load_model(tmp_path / "m.safetensors") as old:
        old_steps = old["steps"].copy()
    make_model(tmp_path / "m.safetensors", 5)  # replaced: new inode or mtime
    os.utime(tmp_path / "m.safetensors", ns=(1, 1))
    with client.load_model(tmp_path / "m.safetensors") as new:
        assert not new.shared
        assert new.metadata == {"seed": "5"}
    assert old_steps.tolist() == list(range(10))


def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_a_different_model(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    """A file's owner can rewrite it (same inode, same size) and set its
    mtime back; a deleted file's inode number goes to the next file made,
    possibly another uid's, which can copy size and mtime. Only the ctime,
    which nobody sets, tells: such a file is not the resident model."""
    path = tmp_path / "m.safetensors"
    make_model(path, 6)
    before = path.stat()
    with daemon.connect() as first, first.load_model(path) as old:
        old_bias = old["layer.0.bias"].tobytes()
        with open(path, "r+b") as fh:  # same size, new bytes, same inode
            fh.write(make_model_bytes(tmp_path, 7))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        with daemon.connect() as second, second.load_model(path) as new:
            assert not new.shared
            assert new.metadata == {"seed": "7"}
            assert new["layer.0.bias"].tobytes() != old_bias


def make_model_bytes(directory: Path, seed: int) -> bytes:
    scratch = directory / f"scratch-{seed}.safetensors"
    make_model(scratch, seed)
    data = scratch.read_bytes()
    scratch.unlink()
    return data


def test_a_model_taken_again_while_copies_of_its_fds_live_is_charged_once(
    daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A process that let go of a model but kept copies of its fds stays
    charged for it (lingering); taking the model again must not charge it
    a second time. A non-root uid: root is checked in its own process."""
    public = Path(tempfile.mkdtemp(prefix="dmabufd-model-"))
    public.chmod(0o755)
    make_model(public / "m.safetensors", 30)
    (public / "m.safetensors").chmod(0o644)
    daemon = daemon_factory(public=True)
    body = (
        "import contextlib, os\n"
        "def memfds():\n"
        "    found = set()\n"
        "    for name in os.listdir('/proc/self/fd'):\n"
        "        with contextlib.suppress(OSError):\n"
        "            if os.readlink(f'/proc/self/fd/{name}').startswith('/memfd:'):\n"
        "                found.add(int(name))\n"
        "    return found\n"
        "charged = lambda: c.stats().clients[0].charged_bytes\n"
        "before = memfds()\n"
        f"model = c.load_model({str(public / 'm.safetensors')!r})\n"
        "kept = [os.dup(fd) for fd in memfds() - before]\n"
        "model.close()\n"
        "once = charged()\n"
        f"again = c.load_model({str(public / 'm.safetensors')!r})\n"
        "print(once, charged())\n"
    )
    try:
        result = run_as_rootless_client(daemon, body)
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    once, after = map(int, result.stdout.split())
    assert once > 0, "the kept fds keep the model charged"
    assert after == once, "charged twice for one model"


def test_idle_models_are_evicted_under_the_budget(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory('[loading]\nmodel_budget_bytes = "3M"\n')
    for seed in (10, 11):
        make_model(tmp_path / f"m{seed}.safetensors", seed, megabytes=2)
    make_model(tmp_path / "m12.safetensors", 12, megabytes=2)
    make_model(tmp_path / "huge.safetensors", 13, megabytes=4)
    with daemon.connect() as client:
        with client.load_model(tmp_path / "m10.safetensors"):
            pass
        held = client.load_model(tmp_path / "m11.safetensors")
        assert client.stats().models == 1, "the idle model made room"
        with pytest.raises(dmabufd_client.ResourceExhausted, match="in use and loads running hold"):
            client.load_model(tmp_path / "m12.safetensors")
        held.close()
        with pytest.raises(dmabufd_client.ResourceExhausted, match="whole model budget"):
            client.load_model(tmp_path / "huge.safetensors")


def test_a_model_header_counts_against_the_budget(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """A resident model keeps its parsed header (names, shapes, metadata as
    Python objects, many times the header's size): 12,000 one-byte tensors
    make a 0.6 MB header in a file of under a megabyte, which must not slip
    under a 16 MiB budget that counted only buffers."""
    daemon = daemon_factory('[loading]\nmodel_budget_bytes = "16M"\n')
    tensors = {f"tensor_{index:05d}": np.array([index % 256], dtype=np.uint8) for index in range(12_000)}
    save_file(tensors, str(tmp_path / "many.safetensors"))
    make_model(tmp_path / "few.safetensors", 14)
    with daemon.connect() as client:
        with pytest.raises(dmabufd_client.ResourceExhausted, match="its parsed header"):
            client.load_model(tmp_path / "many.safetensors")
        with client.load_model(tmp_path / "few.safetensors") as model:
            assert model["steps"].tolist() == list(range(10))


def test_loads_running_at_once_cannot_pass_the_budget_together(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    """Two models that each fit the budget but not both, loaded at once by
    two clients: the first load's bytes are reserved as it starts, so the
    second is refused whichever way they overlap; never both resident."""
    daemon = daemon_factory('[loading]\nmodel_budget_bytes = "12M"\n')
    for seed in (20, 21):
        make_model(tmp_path / f"m{seed}.safetensors", seed, megabytes=8)
    start = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def load(seed: int) -> None:
        with daemon.connect() as client:
            start.wait()
            try:
                model = client.load_model(tmp_path / f"m{seed}.safetensors")
            except dmabufd_client.ResourceExhausted:
                outcomes[seed] = "refused"
                return
            outcomes[seed] = "loaded"
            time.sleep(0.5)  # held while the other one tries
            model.close()

    threads = [threading.Thread(target=load, args=(seed,)) for seed in (20, 21)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes.values()) == ["loaded", "refused"], outcomes


def test_tensors_never_straddle_buffers(daemon_factory: DaemonFactory, tmp_path: Path) -> None:
    daemon = daemon_factory('[heaps]\nmax_buffer_bytes = "1M"\n')
    rng = np.random.default_rng(7)
    tensors = {f"t{i}": rng.standard_normal(60_000).astype(np.float32) for i in range(6)}  # 240 KB each
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with daemon.connect() as client, client.load_model(tmp_path / "m.safetensors") as model:
        assert len(model._fds) >= 2
        for name, expected in tensors.items():
            assert np.array_equal(model[name], expected)


def test_a_large_memfd_model_is_spread_over_buffers_the_lanes_write_at_once(
    client: dmabufd_client.Client, tmp_path: Path
) -> None:
    """Past 128 MiB of tensors, a model bound for memfds comes in several
    buffers (a memfd takes one write at a time); each tensor is still whole
    in one of them, and verify checks every buffer."""
    rng = np.random.default_rng(17)
    tensors = {f"layer.{i}": rng.integers(0, 255, 24 << 20, dtype=np.uint8) for i in range(7)}  # 168 MiB
    save_file(tensors, str(tmp_path / "big.safetensors"))
    with client.load_model(tmp_path / "big.safetensors", verify=True) as model:
        assert model.stats.verified
        assert model.stats.method == "direct-read"
        assert len(model._fds) == 2, "two shares of about 84 MiB"
        for name, expected in tensors.items():
            assert np.array_equal(model[name], expected), name


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'{"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99999]}}', "fall outside"),
        (
            b'{"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},'
            b' "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}',
            "overlap",
        ),
        (b'{"t": {"dtype": "F32", "shape": [1099511627776], "data_offsets": [0, 16]}}', "needs"),
        (b"not json at all", "not valid JSON"),
        (b"{}", "no tensors"),
    ],
)
def test_hostile_models_are_refused(daemon: RunningDaemon, tmp_path: Path, header: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with daemon.connect() as client:
        client.heaps()
        baseline = daemon.settled_fd_count()
        with pytest.raises(dmabufd_client.InvalidArgument, match=message):
            client.load_model(path)
        assert client.stats().models == 0
        assert daemon.wait_for_fd_count(baseline) == baseline
