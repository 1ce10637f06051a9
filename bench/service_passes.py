"""The dmabufd passes of bench.compare: LoadFile and LoadModel through the Python client, each
in a private daemon started for it.

CPU is the daemon's utime+stime from /proc/<pid>/stat over the call plus this process's (the
client's) rusage; the daemon's own reported figure is kept beside it in `extra`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

import dmabufd_client
from bench.modelfile import ModelFile, write_model
from bench.passes import Cache, CacheState, Pass, check_tensors
from bench.runner import check_samples, map_placements
from bench.service_row import CALL_TIMEOUT_S, Daemon, describe, running_daemon
from bench.system import cpu_seconds, proc_cpu_seconds
from bench.testfile import SourceFile, write_pattern_file

WARMUP_FILE_BYTES = 4 << 20
WARMUP_MODEL_BYTES = 1 << 20
# How long a new daemon may take to prepare its memfd reserve before the pass gives up.
RESERVE_READY_TIMEOUT_S = 60.0


class ReserveNotReady(Exception):
    """The daemon's memfd reserve was not prepared in time."""


class Meter:
    """Wall time, this process's CPU and the daemon's CPU over a `with` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.wall_s = self.client_cpu_s = self.daemon_cpu_s = 0.0
        self._t0 = self._cpu0 = self._daemon0 = 0.0

    def __enter__(self) -> Meter:
        self._daemon0 = proc_cpu_seconds(self.pid)
        self._cpu0, self._t0 = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self.client_cpu_s = cpu_seconds() - self._cpu0
        self.daemon_cpu_s = proc_cpu_seconds(self.pid) - self._daemon0

    @property
    def cpu_s(self) -> float:
        return self.daemon_cpu_s + self.client_cpu_s

    def extra(self, stats: dmabufd_client.LoadStats) -> dict[str, Any]:
        return {
            "method": stats.method,
            "reported": dataclasses.asdict(stats),
            "daemon_wall_s_reported": stats.wall_seconds,
            "daemon_cpu_s": self.daemon_cpu_s,
            "daemon_cpu_s_reported": stats.cpu_seconds,
            "client_cpu_s": self.client_cpu_s,
        }


@dataclass
class Session:
    daemon: Daemon
    client: dmabufd_client.Client
    stack: contextlib.ExitStack

    @property
    def pid(self) -> int:
        # A private daemon: started here, so its pid is known.
        assert self.daemon.pid is not None
        return self.daemon.pid

    def another_client(self) -> dmabufd_client.Client:
        return self.stack.enter_context(dmabufd_client.connect(self.daemon.runtime_dir, CALL_TIMEOUT_S))


class Service:
    """The daemons of the dmabufd rows. A new private one for every pass: a model stays resident
    after its last client lets go (the next client would share it, not load it), so a cold
    LoadModel needs a daemon that has not seen the file. Each new daemon first loads a small file
    and a small model, so that no pass pays for first-call set-up (imports, thread pools, heap
    probes)."""

    def __init__(self, config: Path | None, scratch: Path, *, reserved: bool = False) -> None:
        """reserved: the config has a memfd reserve ([heaps] memfd_reserve), and a pass starts
        only once the daemon has prepared all of it, as a daemon that has been up a while has."""
        self.config = config
        self.reserved = reserved
        self.warmup_file = scratch / "warmup.bin"
        self.warmup_model = scratch / "warmup.safetensors"
        write_pattern_file(self.warmup_file, WARMUP_FILE_BYTES)
        write_model(self.warmup_model, WARMUP_MODEL_BYTES)

    how = "a private daemon started for every pass (after a warm-up load of a 4 MiB file and a 1 MiB model)"

    def cleanup(self) -> None:
        self.warmup_file.unlink(missing_ok=True)
        self.warmup_model.unlink(missing_ok=True)

    def _warm_up(self, client: dmabufd_client.Client) -> None:
        client.load_file(str(self.warmup_file), name="bench-warmup").close()
        with client.load_model(str(self.warmup_model)) as model:
            for name in model:
                model[name]

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with contextlib.ExitStack() as stack:
            daemon = stack.enter_context(running_daemon(None, self.config))
            client = stack.enter_context(dmabufd_client.connect(daemon.runtime_dir, CALL_TIMEOUT_S))
            self._warm_up(client)
            if self.reserved:
                wait_for_reserve(client)
            yield Session(daemon, client, stack)


def wait_for_reserve(client: dmabufd_client.Client) -> None:
    deadline = time.monotonic() + RESERVE_READY_TIMEOUT_S
    while True:
        (memfd,) = [heap for heap in client.heaps() if heap.backend is dmabufd_client.Backend.MEMFD]
        if not memfd.reserve_bytes:
            raise ReserveNotReady("the daemon has no memfd reserve: its config sets no heaps.memfd_reserve")
        if memfd.reserve_ready_bytes is None:
            raise ReserveNotReady("the daemon does not tell this uid how much of its reserve is ready (admins only)")
        if memfd.reserve_ready_bytes == memfd.reserve_bytes:
            return
        if time.monotonic() > deadline:
            raise ReserveNotReady(
                f"the daemon prepared {memfd.reserve_ready_bytes} of its {memfd.reserve_bytes} bytes of memfd "
                f"reserve in {RESERVE_READY_TIMEOUT_S:.0f} s"
            )
        time.sleep(0.02)


def loadfile_pass(service: Service, cache: Cache, source: SourceFile, state: CacheState, method: str = "auto") -> Pass:
    """client.load_file of the whole file (the daemon picks the heap for usage
    model-weights, and the method unless `method` names one); the bytes are
    sampled against the file after the clock stops."""
    with service.session() as session:
        cached = cache.set(state, source.path)
        with Meter(session.pid) as meter:
            loaded = session.client.load_file(str(source.path), name="bench-compare", method=method)
        try:
            buffer_bytes = sum(buffer.info.size for buffer in loaded.buffers)
            if service.reserved and loaded.stats.prepared_bytes != buffer_bytes:
                # Say so rather than time a plain load under the reserve row's name.
                raise ReserveNotReady(
                    f"{loaded.stats.prepared_bytes} of the load's {buffer_bytes} buffer bytes were prepared: "
                    "the reserve does not serve this load (a heap other than memfd?)"
                )
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
    extra = meter.extra(loaded.stats)
    extra.update(cached_before=cached, buffers=len(loaded.buffers), release_s=release_s, samples_checked=samples)
    return Pass(meter.wall_s, meter.cpu_s, source.size, extra)


def touch_pages(arrays: Mapping[str, Any]) -> float:
    """Seconds to read one byte of every page of every array: the page faults a zero-copy
    mapping defers to first use (safetensors' copies have paid theirs already)."""
    t0 = time.perf_counter()
    for array in arrays.values():
        flat = array.reshape(-1).view(np.uint8)
        int(flat[:: os.sysconf("SC_PAGE_SIZE")].sum())
    return time.perf_counter() - t0


@contextlib.contextmanager
def _held_model(pid: int, client: dmabufd_client.Client, model: ModelFile, cached: float | None) -> Iterator[Pass]:
    """One client's load_model, timed until every tensor is a numpy array (the call's contract:
    zero-copy views of the shared buffers); the model stays open inside the `with`."""
    with Meter(pid) as meter:
        loaded = client.load_model(str(model.path))
        arrays = {name: loaded[name] for name in loaded}
    try:
        extra = meter.extra(loaded.stats)
        extra.update(
            cached_before=cached,
            shared=loaded.shared,
            tensors=len(loaded),
            touch_s=touch_pages(arrays),
            samples_checked=check_tensors(model, arrays),
        )
        yield Pass(meter.wall_s, meter.cpu_s, model.size, extra)
    finally:
        arrays.clear()
        loaded.close()


def loadmodel_pass(service: Service, cache: Cache, model: ModelFile, state: CacheState, second: bool) -> list[Pass]:
    """client.load_model in a new daemon; with `second`, another client (connected beforehand)
    then asks for the same model while the first still holds it, timed the same way: the daemon
    shares it, loads nothing. Returns the first client's pass, then the second's."""
    with service.session() as session:
        other = session.another_client() if second else None
        cached = cache.set(state, model.path)
        with _held_model(session.pid, session.client, model, cached) as first:
            if other is None:
                return [first]
            with _held_model(session.pid, other, model, None) as shared:
                return [first, shared]
