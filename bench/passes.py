"""One timed pass of each thing bench.compare compares, with the file in the cache state the
pass asks for.

Every pass returns wall seconds, CPU seconds and bytes, plus what else it learnt (`extra`,
printed by --json). CPU is whoever did the work: this process's rusage (all threads) for what
runs here (the raw reader, safetensors); fio's own usr+sys; for dmabufd the daemon's
utime+stime from /proc/<pid>/stat over the call plus this process's (the client's) rusage.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import mmap
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

import dmabufd_client
from bench import fio as fio_runner
from bench.modelfile import ModelFile, write_model
from bench.rawread import ReusedBuffers, read_direct
from bench.runner import check_samples, map_placements
from bench.service_row import CALL_TIMEOUT_S, Daemon, describe, running_daemon
from bench.system import CacheDropper, cpu_seconds, proc_cpu_seconds
from bench.testfile import SourceFile, write_pattern_file

COLD, WARM = "cold", "warm"
_READ_BYTES = 8 << 20
_SAMPLE = 64
_PAGE = os.sysconf("SC_PAGE_SIZE")
WARMUP_FILE_BYTES = 4 << 20
WARMUP_MODEL_BYTES = 1 << 20


class Skip(Exception):
    """The pass cannot run here; the message is the reason (the row is skipped, not failed)."""


class Mismatch(Exception):
    """What a loader returned is not the file's bytes."""


@dataclass
class Pass:
    wall_s: float
    cpu_s: float
    bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


def plain(value: object) -> Any:
    """`value` as JSON can hold it: what a load result reports, whatever fields it grows."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item) for item in value]
    if hasattr(value, "__dict__"):
        return {key: plain(item) for key, item in vars(value).items() if not key.startswith("_")}
    return str(value)


# -- the page cache ---------------------------------------------------------------------------


def read_through(path: Path) -> None:
    """Read the whole file with buffered reads, so the page cache holds all of it."""
    buffer = bytearray(_READ_BYTES)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_fraction(path: Path) -> float | None:
    """The share of the file's pages in the page cache (mincore over a mapping that is never
    touched), or None if it cannot be told: proof that cold is cold and warm is warm."""
    size = path.stat().st_size
    if size == 0:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Python's mmap cannot give its address without a writable mapping: libc's it is.
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            return None
        try:
            pages = -(-size // _PAGE)
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                return None
            resident = bytes(vector)
            return 1 - resident.count(0) / pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


class Cache:
    """Puts a file in the state a pass needs. Cold: drop_caches (after sync), or, where that is
    refused, posix_fadvise(DONTNEED) over the file. Warm: the file read whole just before.
    set() returns the share of the file then cached, for the pass to report."""

    def __init__(self, dropper: CacheDropper) -> None:
        self.dropper = dropper

    @property
    def how_cold(self) -> str:
        return self.dropper.how

    how_warm = "the whole file read with buffered reads just before the pass"

    def set(self, state: str, path: Path) -> float | None:
        if state == WARM:
            read_through(path)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.dropper.drop(fd)
            finally:
                os.close(fd)
        return cached_fraction(path)


# -- fio and the raw reader ---------------------------------------------------------------------


def fio_pass(fio: fio_runner.Fio, cache: Cache, source: SourceFile, block: int, depth: int) -> Pass:
    cached = cache.set(COLD, source.path)
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
    cached = cache.set(COLD, source.path)
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


# -- safetensors ------------------------------------------------------------------------------


def _check_tensor(model: ModelFile, fd: int, name: str, array: Any) -> None:
    tensor = next(t for t in model.tensors if t.name == name)
    begin, end = model.file_range(tensor)
    length = min(_SAMPLE, end - begin)
    got = np.ascontiguousarray(array).reshape(-1).view(np.uint8)[:length].tobytes()
    if got != os.pread(fd, length, begin):
        raise Mismatch(f"tensor {name}: its first {length} bytes are not the file's")


def check_tensors(model: ModelFile, arrays: Mapping[str, Any]) -> int:
    """Every tensor is there; the first bytes of the first, middle and last match the file."""
    if set(arrays) != {tensor.name for tensor in model.tensors}:
        raise Mismatch(f"{len(arrays)} tensors returned, the file has {len(model.tensors)}")
    names = [tensor.name for tensor in model.tensors]
    picks = sorted({names[0], names[len(names) // 2], names[-1]})
    fd = os.open(model.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for name in picks:
            _check_tensor(model, fd, name, arrays[name])
    finally:
        os.close(fd)
    return len(picks)


def safetensors_pass(cache: Cache, model: ModelFile, state: str, how: str) -> Pass:
    """safetensors' numpy loader: `load_file` (its own helper) or `safe_open` with get_tensor
    for every name. Both copy every tensor into a new numpy array."""
    import safetensors
    import safetensors.numpy

    if any(tensor.dtype == "BF16" for tensor in model.tensors):
        from bench.modelfile import bf16_arrays

        missing = bf16_arrays()
        if missing is not None:
            raise Skip(f"safetensors.numpy cannot return BF16 tensors here: {missing}")
    cached = cache.set(state, model.path)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    if how == "load_file":
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


# -- dmabufd ----------------------------------------------------------------------------------


class Meter:
    """Wall time, this process's CPU and the daemon's CPU over a `with` block."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.wall_s = self.client_cpu_s = 0.0
        self.daemon_cpu_s: float | None = None

    def __enter__(self) -> Meter:
        self._daemon0 = proc_cpu_seconds(self.pid) if self.pid is not None else None
        self._cpu0, self._t0 = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.client_cpu_s = cpu_seconds() - self._cpu0
        if self.pid is not None and self._daemon0 is not None:
            self.daemon_cpu_s = proc_cpu_seconds(self.pid) - self._daemon0

    def extra(self, reported_cpu_s: float) -> dict[str, Any]:
        return {
            "daemon_cpu_s": self.daemon_cpu_s,
            "daemon_cpu_s_reported": reported_cpu_s,
            "client_cpu_s": self.client_cpu_s,
        }

    def cpu_s(self, reported_cpu_s: float) -> float:
        # Without the pid (another user's daemon) the daemon's own figure stands in.
        daemon = self.daemon_cpu_s if self.daemon_cpu_s is not None else reported_cpu_s
        return daemon + self.client_cpu_s


@dataclass
class Session:
    daemon: Daemon
    client: dmabufd_client.Client
    stack: contextlib.ExitStack

    def another_client(self) -> dmabufd_client.Client:
        return self.stack.enter_context(dmabufd_client.connect(self.daemon.runtime_dir, CALL_TIMEOUT_S))


class Service:
    """The daemon of the dmabufd rows. A private one is started for every pass: a model stays
    resident after its last client lets go (the next client would share it, not load it), so
    a cold LoadModel needs a daemon that has not seen the file. Each new daemon first loads a
    small file and a small model, so no pass pays for first-call set-up (imports, thread
    pools, heap probes). With --runtime-dir the running daemon serves every pass instead, and
    the model file's mtime is moved before each LoadModel: a new file to the daemon."""

    def __init__(self, runtime_dir: Path | None, config: Path | None, scratch: Path) -> None:
        self.runtime_dir = runtime_dir
        self.config = config
        self.warmup_file = scratch / "warmup.bin"
        self.warmup_model = scratch / "warmup.safetensors"
        write_pattern_file(self.warmup_file, WARMUP_FILE_BYTES)
        write_model(self.warmup_model, WARMUP_MODEL_BYTES)
        self._stamp = time.time_ns()

    @property
    def how(self) -> str:
        if self.runtime_dir is None:
            return "a private daemon started for every pass (after a warm-up load of a 4 MiB file and a 1 MiB model)"
        return f"the daemon at {self.runtime_dir} (the model file's mtime is moved before each LoadModel)"

    def cleanup(self) -> None:
        self.warmup_file.unlink(missing_ok=True)
        self.warmup_model.unlink(missing_ok=True)

    def new_identity(self, path: Path) -> None:
        """A running daemon shares a model it holds: a new mtime makes the file a new model."""
        if self.runtime_dir is not None:
            self._stamp += 1_000_000_000
            os.utime(path, ns=(self._stamp, self._stamp))

    def _warm_up(self, client: dmabufd_client.Client) -> None:
        client.load_file(str(self.warmup_file), name="bench-warmup").close()
        with client.load_model(str(self.warmup_model)) as model:
            for name in model:
                model[name]

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with contextlib.ExitStack() as stack:
            daemon = stack.enter_context(running_daemon(self.runtime_dir, self.config))
            client = stack.enter_context(dmabufd_client.connect(daemon.runtime_dir, CALL_TIMEOUT_S))
            if daemon.private:
                self._warm_up(client)
            yield Session(daemon, client, stack)


def _reported(stats: object, **more: object) -> dict[str, Any]:
    reported = plain(stats)
    result = dict(reported) if isinstance(reported, dict) else {"stats": reported}
    result.update({key: plain(value) for key, value in more.items()})
    return result


def loadfile_pass(service: Service, cache: Cache, source: SourceFile, state: str) -> Pass:
    """client.load_file of the whole file (the daemon picks heap and method for usage
    model-weights); the bytes are sampled against the file after the clock stops."""
    with service.session() as session:
        cached = cache.set(state, source.path)
        with Meter(session.daemon.pid) as meter:
            loaded = session.client.load_file(str(source.path), name="bench-compare")
        try:
            outcome = describe(loaded, source.size)
            fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with contextlib.ExitStack() as maps:
                    regions = map_placements(outcome, maps, source.size)
                    samples = sum(check_samples(source, fd, region) for region in regions)
            finally:
                os.close(fd)
        finally:
            t0 = time.perf_counter()
            loaded.close()
            release_s = time.perf_counter() - t0
    return Pass(
        meter.wall_s,
        meter.cpu_s(outcome.cpu_seconds),
        source.size,
        {
            "cached_before": cached,
            "method": outcome.method,
            "reported": _reported(getattr(loaded, "stats", None)),
            "buffers": len(outcome.buffers),
            "daemon_wall_s_reported": outcome.wall_seconds,
            **meter.extra(outcome.cpu_seconds),
            "release_s": release_s,
            "samples_checked": samples,
        },
    )


def touch_pages(arrays: Mapping[str, Any]) -> float:
    """Seconds to read one byte of every page of every array: the page faults a zero-copy
    mapping defers to first use (safetensors' copies have paid theirs already)."""
    t0 = time.perf_counter()
    for array in arrays.values():
        flat = array.reshape(-1).view(np.uint8)
        int(flat[::_PAGE].sum())
    return time.perf_counter() - t0


def _model_extra(model: dmabufd_client.Model, meter: Meter, touch_s: float) -> dict[str, Any]:
    stats = model.stats
    return {
        "method": stats.method,
        "reported": _reported(stats, shared=model.shared, read_only_enforced=model.read_only_enforced),
        "shared": model.shared,
        "tensors": len(model),
        "daemon_wall_s_reported": stats.wall_seconds,
        **meter.extra(stats.cpu_seconds),
        "touch_s": touch_s,
    }


def loadmodel_pass(service: Service, cache: Cache, model: ModelFile, state: str, second: bool) -> dict[str, Pass]:
    """client.load_model, timed until every tensor is a numpy array (the call's contract: zero-
    copy views of the shared buffers). With `second`, another client then asks for the same
    model while the first holds it, timed the same way: the daemon shares, loads nothing.
    Returns {"first": ..., "second": ...}."""
    service.new_identity(model.path)
    passes: dict[str, Pass] = {}
    with service.session() as session:
        other = session.another_client() if second else None
        cached = cache.set(state, model.path)
        with Meter(session.daemon.pid) as meter:
            loaded = session.client.load_model(str(model.path))
            arrays = {name: loaded[name] for name in loaded}
        try:
            touch_s = touch_pages(arrays)
            extra = _model_extra(loaded, meter, touch_s)
            extra["cached_before"] = cached
            extra["samples_checked"] = check_tensors(model, arrays)
            passes["first"] = Pass(meter.wall_s, meter.cpu_s(loaded.stats.cpu_seconds), model.size, extra)
            if other is not None:
                with Meter(session.daemon.pid) as meter2:
                    shared = other.load_model(str(model.path))
                    arrays2 = {name: shared[name] for name in shared}
                try:
                    extra2 = _model_extra(shared, meter2, touch_pages(arrays2))
                    extra2["samples_checked"] = check_tensors(model, arrays2)
                    cpu2 = meter2.cpu_s(shared.stats.cpu_seconds)
                    passes["second"] = Pass(meter2.wall_s, cpu2, model.size, extra2)
                finally:
                    arrays2.clear()
                    shared.close()
        finally:
            arrays.clear()
            loaded.close()
    return passes
