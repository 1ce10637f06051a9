"""One timed pass of each reference loader bench.compare measures dmabufd against (fio, the raw
O_DIRECT reader, safetensors' numpy loaders), with the file in the cache state the pass asks for.
The dmabufd passes are in bench.service_passes.

Every pass returns wall seconds, CPU seconds and bytes, plus what else it learnt (`extra`,
printed by --json). CPU is whoever did the work: fio's own usr+sys; this process's rusage (all
threads) for what runs here (the raw reader, safetensors).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from bench import fio as fio_runner
from bench.modelfile import ModelFile
from bench.rawread import ReusedBuffers, read_direct
from bench.system import CacheDropper, cached_fraction, cpu_seconds, read_through
from bench.testfile import SourceFile

_SAMPLE = 64


class CacheState(Enum):
    COLD = "cold"
    WARM = "warm"


class Mismatch(Exception):
    """What a loader returned is not the file's bytes."""


@dataclass
class Pass:
    wall_s: float
    cpu_s: float
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


class Cache:
    """Puts a file in the state a pass needs. Cold: drop_caches (after sync), or, where that is
    refused, posix_fadvise(DONTNEED) over the file. Warm: the file read whole just before.
    set() returns the share of the file then cached, for the pass to report."""

    how_warm = "the whole file read with buffered reads just before the pass"

    def __init__(self, dropper: CacheDropper) -> None:
        self.dropper = dropper

    @property
    def how_cold(self) -> str:
        return self.dropper.how

    def set(self, state: CacheState, path: Path) -> float | None:
        if state is CacheState.WARM:
            read_through(path)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.dropper.drop(fd)
            finally:
                os.close(fd)
        return cached_fraction(path)


def fio_pass(fio: fio_runner.Fio, cache: Cache, source: SourceFile, block: int, depth: int) -> Pass:
    cached = cache.set(CacheState.COLD, source.path)
    run = fio_runner.run(fio, source.path, source.size, block, depth)
    return Pass(
        run.runtime_s,
        run.cpu_s,
        run.bytes,
        {
            "cached_before": cached,
            "engine": fio.engine,
            "depth": depth,
            "block": block,
            "usr_cpu_pct": run.usr_pct,
            "sys_cpu_pct": run.sys_pct,
            "process_cpu_s": run.process_cpu_s,
            "process_wall_s": run.process_wall_s,
            "command": run.command,
        },
    )


def raw_pass(cache: Cache, source: SourceFile, block: int, depth: int, reused: ReusedBuffers | None) -> Pass:
    cached = cache.set(CacheState.COLD, source.path)
    run = read_direct(source.path, source.size, block, depth, reused)
    return Pass(
        run.wall_s,
        run.cpu_s,
        source.size,
        {
            "cached_before": cached,
            "memory": "reused" if reused is not None else "fresh",
            "depth": depth,
            "block": block,
            "release_s": run.release_s,
            "samples_checked": run.samples_checked,
        },
    )


def check_tensors(model: ModelFile, arrays: Mapping[str, Any]) -> int:
    """Every tensor is there; the first bytes of the first, middle and last match the file.
    Returns how many were compared."""
    if set(arrays) != {tensor.name for tensor in model.tensors}:
        raise Mismatch(f"{len(arrays)} tensors returned, the file has {len(model.tensors)}")
    picks = {model.tensors[0], model.tensors[len(model.tensors) // 2], model.tensors[-1]}
    fd = os.open(model.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for tensor in picks:
            begin, end = model.file_range(tensor)
            length = min(_SAMPLE, end - begin)
            # Compared as bytes: dmabufd hands dtypes numpy lacks (BF16) over as raw bits.
            got = np.ascontiguousarray(arrays[tensor.name]).reshape(-1).view(np.uint8)[:length].tobytes()
            if got != os.pread(fd, length, begin):
                raise Mismatch(f"tensor {tensor.name}: its first {length} bytes are not the file's")
    finally:
        os.close(fd)
    return len(picks)


SAFETENSORS_CALLS = ("load_file", "safe_open")


def safetensors_pass(cache: Cache, model: ModelFile, state: CacheState, call: str) -> Pass:
    """safetensors' numpy loader: `load_file` (its own helper) or `safe_open` with get_tensor
    for every name. Both copy every tensor into a new numpy array."""
    cached = cache.set(state, model.path)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    if call == "load_file":
        arrays: dict[str, Any] = safetensors.numpy.load_file(model.path)
    else:
        with safetensors.safe_open(str(model.path), framework="numpy") as opened:
            arrays = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118 (not a dict)
    t1, cpu1 = time.perf_counter(), cpu_seconds()
    try:
        samples = check_tensors(model, arrays)
    finally:
        arrays.clear()
    extra = {"cached_before": cached, "tensors": len(model.tensors), "samples_checked": samples}
    return Pass(t1 - t0, cpu1 - cpu0, model.size, extra)
