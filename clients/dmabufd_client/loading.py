"""Files and models loaded by dmabufd, as the client sees them.

LoadedFile owns the buffers a LoadFile call made; Model maps tensor names
to read-only numpy arrays over the buffers of a resident model, and gives
torch tensors over them (Model.torch, Model.state_dict), without copying.
Both close deterministically (close(), or a `with` block); a Model whose
arrays or tensors outlive close() lets go of the model when the last of
them goes.

A streamed Model (load_model(stream=True)) exists before its bytes are all
in: a thread of its own follows the rest of the load, and each tensor
becomes available once the daemon says its bytes have landed (wait(),
as_ready(); model[name] waits too).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import mmap
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dmabufd_client.buffer import Buffer
from dmabufd_client.errors import DmabufdError, ProtocolError
from dmabufd_common import uapi

if TYPE_CHECKING:
    from torch import Tensor

    from dmabufd_client.torch_view import Writes

ProgressCallback = Callable[[int, int], None]

# safetensors dtype -> the numpy dtype its arrays come back as. numpy has no
# bfloat16, float8, float6 or float4: see Model for how those arrive.
NUMPY_DTYPES = {
    "BOOL": "?",
    "U8": "u1",
    "I8": "i1",
    "U16": "<u2",
    "I16": "<i2",
    "F16": "<f2",
    "U32": "<u4",
    "I32": "<i4",
    "F32": "<f4",
    "U64": "<u8",
    "I64": "<i8",
    "F64": "<f8",
    "C64": "<c8",
    "BF16": "<u2",
    "F8_E4M3": "u1",
    "F8_E5M2": "u1",
    "F8_E8M0": "u1",
    "F8_E4M3FNUZ": "u1",
    "F8_E5M2FNUZ": "u1",
    "F6_E2M3": "u1",
    "F6_E3M2": "u1",
    "F4": "u1",
}
# Elements narrower than a byte: no array of the tensor's shape can hold them.
PACKED_DTYPES = frozenset({"F6_E2M3", "F6_E3M2", "F4"})


@dataclass(frozen=True)
class Segment:
    """`length` file bytes from `file_offset` sit in buffer `buffer_id` at `buffer_offset`."""

    buffer_id: int
    buffer_offset: int
    file_offset: int
    length: int


@dataclass(frozen=True)
class LoadedPart:
    """`length` file bytes from `file_offset` came from `source`: "device"
    (O_DIRECT), "page-cache" (cached already, copied from memory) or
    "buffered" (through the page cache: unaligned ends, no direct I/O)."""

    file_offset: int
    length: int
    source: str


@dataclass(frozen=True)
class LoadStats:
    method: str
    bytes: int
    wall_seconds: float
    cpu_seconds: float
    verified: bool
    parallelism: int
    # Where each part of the file came from, in file order.
    parts: tuple[LoadedPart, ...] = ()
    # Bytes copied from the page cache (the "page-cache" parts).
    bytes_from_cache: int = 0
    # load_model: seconds from the start of the load (as wall_seconds counts
    # it) until the first tensor with bytes had them all in its buffer,
    # streamed or not; for a shared model, the time to attach.
    first_tensor_seconds: float = 0.0
    # Bytes of the buffers made that were prepared memfds, their pages
    # allocated before the call (the daemon's heaps.memfd_reserve).
    prepared_bytes: int = 0


# What the rest of a streamed load says, message by message: the tensors
# that became ready (indexes into the model's tensors, in the daemon's
# order), and the load's statistics on the last message only.
LoadEvents = Iterator[tuple[list[int], "LoadStats | None"]]


class LoadedFile:
    def __init__(self, buffers: list[Buffer], segments: list[Segment], stats: LoadStats) -> None:
        self.buffers = buffers
        self.segments = segments
        self.stats = stats

    @property
    def method(self) -> str:
        return self.stats.method

    def buffer_of(self, segment: Segment) -> Buffer:
        return next(buffer for buffer in self.buffers if buffer.id == segment.buffer_id)

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()

    def __enter__(self) -> LoadedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    buffer_id: int
    offset: int
    nbytes: int


class _Holding:
    """What an open Model holds: its fds and its booking in the daemon.

    Every mapping of the model's buffers is counted while it exists (numpy
    arrays and torch tensors keep theirs alive by reference); the daemon's
    ReleaseModel, the end of the dma-buf sync bracket and the closing of the
    fds happen once, when the Model is closed and no mapping is left,
    whichever comes last. Holds no mapping itself, so that a Model dropped
    without close() is not kept alive by its own bookkeeping.
    """

    def __init__(self, model_id: int, fds: dict[int, int], dma_buf: bool, release: Callable[[int], None]) -> None:
        self.model_id = model_id
        self.fds = fds
        self.dma_buf = dma_buf
        self._release = release
        # Reentrant: a mapping's finalizer may run inside this class's own
        # calls, whenever the garbage collector runs.
        self._lock = threading.RLock()
        self._mappings = 0
        self._open = True
        self.released = False
        # Whether the daemon holds the model for this session: a streamed
        # model only once its load completed (a failed one is not there to
        # release).
        self.published = True

    def track(self, region: mmap.mmap) -> None:
        with self._lock:
            self._mappings += 1
        # Not at exit: the session's end releases the model then anyway.
        weakref.finalize(region, self._untrack).atexit = False

    def _untrack(self) -> None:
        with self._lock:
            self._mappings -= 1
            last = self._take_last()
        if last:
            self._let_go()

    def close(self) -> None:
        with self._lock:
            self._open = False
            last = self._take_last()
        if last:
            self._let_go()

    def _take_last(self) -> bool:
        """Whether the caller is the one to let go (caller holds _lock)."""
        if self._open or self._mappings or self.released:
            return False
        self.released = True
        return True

    def _let_go(self) -> None:
        # The fds first: the daemon keeps a model released while this
        # process still holds it charged until it sees it gone.
        try:
            for fd in self.fds.values():
                try:
                    if self.dma_buf:
                        uapi.dma_buf_sync(fd, uapi.SyncFlags.END | uapi.SyncFlags.READ)
                finally:
                    os.close(fd)
        finally:
            if self.published:
                self._release(self.model_id)


def read_to_end(call: Iterable[object], quiet: type[BaseException]) -> None:
    """Read a streamed call's messages to its end, ignoring errors of type
    `quiet`, before anyone hears the load is over: a caller may then exit
    at once, and gRPC's collection of a half-read call at interpreter exit
    can deadlock on the call's lock (seen: 3 exits in 15). A load cancelled
    mid-way (close()) ends without this wait, so a process that exits right
    after may still meet it, more rarely."""
    with contextlib.suppress(quiet):
        collections.deque(call, maxlen=0)  # the messages after the result carry nothing


class Model(Mapping[str, Any]):
    """Tensor name -> read-only numpy array backed by the model's buffers.

    Dtypes numpy lacks arrive as their raw bits, in an array of the tensor's
    shape: BF16 as uint16, the F8 types (F8_E4M3, F8_E5M2, F8_E8M0 and the
    FNUZ ones) as uint8; view them with ml_dtypes, or take torch tensors of
    the right dtype from torch() and state_dict(). Sub-byte dtypes (F4,
    F6_E2M3, F6_E3M2) arrive as a flat uint8 array of the packed bytes, as
    the file stores them. A zero-size tensor whose other dimensions are too
    large for numpy (safetensors allows up to 2**64-1) arrives flat.

    Streamed (load_model(stream=True)): the Model comes back as soon as the
    daemon has made the buffers, and its tensors become ready as their bytes
    land. model[name], torch(name) and state_dict() wait for the tensors
    they return (wait(name, timeout) bounds the wait); as_ready() yields
    names as they complete; ready_fraction says how far the load is;
    wait_all() waits for the whole load, and stats (which only the end of
    the load knows) waits for it too. A thread of the Model's own follows
    the load until its last message. If the load fails, `error` says why,
    every wait raises it, and the Model closes itself (arrays taken before
    stay valid); close() during the load cancels it, and the daemon frees
    everything.

    Lifetime: the model (its mappings, its fds and its booking in the
    daemon, which keeps it resident and charged to this uid) stays until
    close() and, after it, while any array or tensor over it is still
    referenced; the daemon is told once, when the last of them goes.
    """

    def __init__(
        self,
        model_id: int,
        fds: dict[int, int],
        tensors: list[TensorInfo],
        metadata: dict[str, str],
        *,
        shared: bool,
        read_only_enforced: bool,
        dma_buf: bool,
        stats: LoadStats | None,
        release: Callable[[int], None],
        ready: Iterable[int] = (),
    ) -> None:
        """`stats` None: a streamed load still running, whose tensors
        `ready` (indexes into `tensors`) are in; follow() takes the rest."""
        self.id = model_id
        self.tensors = {tensor.name: tensor for tensor in tensors}
        self.metadata = metadata
        self.shared = shared
        self.read_only_enforced = read_only_enforced
        self._holding = _Holding(model_id, fds, dma_buf, release)
        self._fds = fds
        self._dma_buf = dma_buf
        self._sizes = {buffer_id: os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END) for buffer_id, fd in fds.items()}
        # Shared and read-only: the numpy arrays, and torch tensors whose
        # writes are refused.
        self._maps: dict[int, mmap.mmap] = {}
        for buffer_id, fd in fds.items():
            self._maps[buffer_id] = self._map(buffer_id, mmap.MAP_SHARED, mmap.PROT_READ)
            if dma_buf:  # CPU reads for the model's lifetime: one sync bracket around it
                uapi.dma_buf_sync(fd, uapi.SyncFlags.START | uapi.SyncFlags.READ)
        # Copy-on-write, made on the first torch view of a memfd model.
        self._private_maps: dict[int, mmap.mmap] = {}
        self._arrays: dict[str, Any] = {}
        self._closed = False
        # What a streamed load has delivered so far; guarded by _changed,
        # which waiters wait on. `_complete` is only ever set once (and read
        # without the lock on fast paths).
        self._changed = threading.Condition(threading.Lock())
        self._infos = tensors
        self._stats = stats
        self._complete = stats is not None
        self._error: BaseException | None = None
        self._ready: set[str] = set()
        self._order: list[str] = []  # names, in the order they became ready
        self._ready_bytes = 0
        self._total_bytes = sum(tensor.nbytes for tensor in tensors)
        self._follower: threading.Thread | None = None
        self._cancel: Callable[[], None] | None = None
        if self._complete:
            self._ready.update(self.tensors)
            self._order.extend(self.tensors)
            self._ready_bytes = self._total_bytes
        else:
            self._holding.published = False
            self._arrive_locked(ready)

    def _map(self, buffer_id: int, flags: int, prot: int) -> mmap.mmap:
        region = mmap.mmap(self._fds[buffer_id], self._sizes[buffer_id], flags, prot)
        self._holding.track(region)
        return region

    def _check_open(self) -> None:
        if self._closed:
            if self._error is not None:
                raise self._error
            raise ValueError(f"model {self.id} is closed")

    def __getitem__(self, name: str) -> Any:
        array = self._arrays.get(name)
        if array is None:
            array = self._array(name) if self._complete else self.wait(name)
        return array

    def _array(self, name: str) -> Any:
        array = self._arrays.get(name)
        if array is not None:
            return array
        self._check_open()
        tensor = self.tensors[name]
        dtype = np.dtype(NUMPY_DTYPES[tensor.dtype])
        shape = (tensor.nbytes,) if tensor.dtype in PACKED_DTYPES else tensor.shape
        if tensor.nbytes == 0:  # holds no bytes, so it may have no buffer either
            try:
                array = np.empty(shape, dtype)
            except ValueError:  # dimensions past numpy's limits, beside a 0
                array = np.empty(0, dtype)
            array.flags.writeable = False
        else:
            region = self._maps[tensor.buffer_id]
            array = np.frombuffer(
                region, dtype=dtype, count=tensor.nbytes // dtype.itemsize, offset=tensor.offset
            ).reshape(shape)
        self._arrays[name] = array
        return array

    def __contains__(self, name: object) -> bool:
        # Mapping's own would fetch the array, and so wait for the tensor.
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    # -- streaming ----------------------------------------------------------

    @property
    def stats(self) -> LoadStats:
        """The load's statistics; for a streamed model, once the whole load
        is done (this waits for it, and raises its error)."""
        if self._stats is None:
            self.wait_all()
        assert self._stats is not None
        return self._stats

    @property
    def complete(self) -> bool:
        """Whether every tensor is in and the load is over (always true
        unless streamed)."""
        return self._complete

    @property
    def error(self) -> BaseException | None:
        """Why a streamed load failed (or was cancelled), once it has."""
        return self._error

    @property
    def ready_fraction(self) -> float:
        """How much of the model's bytes can be used now, from 0 to 1."""
        with self._changed:
            if not self._total_bytes:
                return 1.0 if len(self._order) == len(self._infos) else 0.0
            return self._ready_bytes / self._total_bytes

    def is_ready(self, name: str) -> bool:
        if name not in self.tensors:
            raise KeyError(name)
        with self._changed:
            return name in self._ready

    def wait(self, name: str, timeout: float | None = None) -> Any:
        """The array of tensor `name`, once its bytes are in (at once unless
        streamed). Raises KeyError for a name the model lacks, TimeoutError
        when `timeout` seconds pass first, and the load's error if it failed."""
        self._await(name, timeout)
        return self._array(name)

    def _await(self, name: str, timeout: float | None) -> None:
        if name not in self.tensors:
            raise KeyError(name)
        if self._complete:
            return
        with self._changed:
            if not self._changed.wait_for(
                lambda: name in self._ready or self._error is not None or self._closed, timeout
            ):
                raise TimeoutError(f"tensor {name!r} of model {self.id} was not ready within {timeout:g} s")

    def wait_all(self, timeout: float | None = None) -> None:
        """Wait until the whole load is over. Raises TimeoutError when
        `timeout` seconds pass first, and the load's error if it failed."""
        if self._complete:
            return
        with self._changed:
            if not self._changed.wait_for(lambda: self._complete or self._error is not None or self._closed, timeout):
                raise TimeoutError(f"model {self.id} was not loaded within {timeout:g} s")
        if not self._complete:
            self._check_open()
            raise ValueError(f"model {self.id} was closed before its load completed")

    def as_ready(self, timeout: float | None = None) -> Iterator[str]:
        """Each tensor's name once, in the order the tensors became ready
        (those ready already first), until every one has been given.
        Raises TimeoutError when `timeout` seconds pass without a new one,
        and the load's error if it failed."""
        given = 0
        while True:
            with self._changed:
                if not self._changed.wait_for(functools.partial(self._news_after, given), timeout):
                    raise TimeoutError(f"no tensor of model {self.id} became ready within {timeout:g} s")
                batch = self._order[given:]
            if batch:
                given += len(batch)
                yield from batch
                continue
            if given == len(self._infos):
                return
            self._check_open()
            raise ValueError(f"model {self.id} was closed before its load completed")

    def _news_after(self, given: int) -> bool:
        """Whether as_ready() has more to say after `given` names (caller holds _changed)."""
        return len(self._order) > given or given == len(self._infos) or self._error is not None or self._closed

    def follow(self, events: LoadEvents, cancel: Callable[[], None]) -> None:
        """Take the rest of a streamed load from `events` on a thread of
        the Model's own; `cancel` stops the load (close() calls it)."""
        self._cancel = cancel
        self._follower = threading.Thread(
            target=self._follow, args=(events,), name=f"dmabufd-model-{self.id}", daemon=True
        )
        self._follower.start()

    def _follow(self, events: LoadEvents) -> None:
        try:
            for ready, stats in events:
                self._arrive(ready)
                if stats is not None:
                    read_to_end(events, DmabufdError)
                    self._finish(stats)
                    return
            raise ProtocolError("the load ended without a result")
        except BaseException as error:  # whatever it is, the waiters must hear of it
            self._fail(error)

    def _arrive(self, indexes: list[int]) -> None:
        if not indexes:
            return
        if self._dma_buf:
            # The bytes landed after the bracket began: make this CPU see them.
            for buffer_id in {self._infos[index].buffer_id for index in indexes} & self._fds.keys():
                uapi.dma_buf_sync(self._fds[buffer_id], uapi.SyncFlags.START | uapi.SyncFlags.READ)
        with self._changed:
            self._arrive_locked(indexes)
            self._changed.notify_all()

    def _arrive_locked(self, indexes: Iterable[int]) -> None:
        for index in indexes:
            tensor = self._infos[index]
            if tensor.name not in self._ready:
                self._ready.add(tensor.name)
                self._order.append(tensor.name)
                self._ready_bytes += tensor.nbytes

    def _finish(self, stats: LoadStats) -> None:
        with self._changed:
            # The daemon reports every tensor before its result; this only
            # covers a daemon that would not.
            self._arrive_locked(range(len(self._infos)))
            self._stats = stats
            self._holding.published = True
            self._complete = True
            self._changed.notify_all()

    def _fail(self, error: BaseException) -> None:
        with self._changed:
            closing = not self._closed
        # Shut before telling anyone: whoever hears of the error finds the
        # model let go already (close() shuts it itself, after this thread).
        if closing:
            self._shut()
        with self._changed:
            self._error = error
            self._closed = True
            self._changed.notify_all()

    # -- torch ------------------------------------------------------------

    @property
    def torch_writes(self) -> Writes:
        """What a write to this model's torch views does by default:
        "private" (memfd: copy-on-write, seen by this process only) or
        "refuse" (udmabuf, DMA heaps: torch raises RuntimeError). See torch()."""
        return "refuse" if self._dma_buf else "private"

    def _writes(self, writes: Writes | None) -> Writes:
        from dmabufd_client.torch_view import WRITE_MODES

        if writes is None:
            return self.torch_writes
        if writes not in WRITE_MODES:
            raise ValueError(f"writes must be one of {', '.join(WRITE_MODES)}, not {writes!r}")
        if writes == "private" and self._dma_buf:
            raise ValueError(
                'writes="private" needs a memfd model: the kernel refuses private (copy-on-write) mappings of '
                "udmabuf and DMA-heap buffers"
            )
        return writes

    def _torch_buffer(self, buffer_id: int, writes: Writes) -> object:
        from dmabufd_client.torch_view import writable_window

        if writes == "refuse":
            return writable_window(self._maps[buffer_id])
        region = self._private_maps.get(buffer_id)
        if region is None:
            # The memfd is sealed against writes and our fd is O_RDONLY; a
            # private mapping may still be writable: its writes go to pages
            # of this process's own.
            region = self._map(buffer_id, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            self._private_maps[buffer_id] = region
        return region

    def torch(self, name: str, *, writes: Writes | None = None) -> Tensor:
        """The tensor `name` as a torch tensor over the model's buffer: no
        copy, the file's dtype (BF16 as torch.bfloat16, F8_E4M3 as
        torch.float8_e4m3fn, F4 as torch.float4_e2m1fn_x2 with the last
        dimension halved, ...; TypeError for F6, which torch lacks),
        requires_grad False. Needs torch (dmabufd-client[torch]).

        Read-only in meaning. What a write does (`writes`, by default
        torch_writes): "private" (memfd models only) maps the buffer
        copy-on-write, so a write copies the page it lands on into this
        process: neither the shared model, nor other processes, nor this
        Model's numpy arrays see it, but the other torch views of this Model
        in this process do. "refuse" makes every access that could write
        raise RuntimeError (torch's "Cannot access data pointer of Tensor"):
        in-place ops, out=, copy_, item assignment, and also .data_ptr(),
        .numpy() and DLPack export; reads work as usual.

        Conversions to another dtype, device or layout (.half(), .to(dtype),
        .to(device), .contiguous() of a transposed view) are not views:
        torch copies into memory of its own (a conversion to the dtype the
        tensor has already returns the view itself). The tensor keeps the
        model alive (see close()). A streamed model's tensor is waited for
        (as wait() does, without a timeout)."""
        from dmabufd_client import torch_view

        torch_view.require_torch()
        info = self.tensors[name]
        self._await(name, None)
        self._check_open()
        mode = self._writes(writes)
        buffer = self._torch_buffer(info.buffer_id, mode) if info.nbytes else None
        return torch_view.tensor(info, buffer, mode)

    def state_dict(
        self, prefix: str = "", exclude: Iterable[str] = (), *, writes: Writes | None = None
    ) -> dict[str, Tensor]:
        """Key -> torch tensor (as torch() makes them, without a copy) for
        load_state_dict: the tensors whose names start with `prefix`, keyed
        without it (the others are left out), less those `exclude` lists:
        names or glob patterns (fnmatch: `*.position_ids`), matched against
        both the name in the file and the key. For a module built on the
        meta device, load_state_dict(..., assign=True) makes its parameters
        these views, with no copy."""
        from dmabufd_client import torch_view

        chosen = torch_view.select(self.tensors, prefix, exclude)
        return {key: self.torch(name, writes=writes) for key, name in chosen.items()}

    # -- lifetime -----------------------------------------------------------

    @property
    def released(self) -> bool:
        """Whether the model has been let go: close() was called and no
        array or tensor over it is left."""
        return self._holding.released

    def close(self) -> None:
        """Let go of the model: release it in the daemon, end the dma-buf
        sync bracket, unmap and close the fds. Arrays and tensors still
        referenced elsewhere defer all of that until the last of them goes
        (the model stays resident and charged to this uid until then), so
        none of them ever reads unmapped or evicted memory. Further calls to
        model[name], torch() or state_dict() raise ValueError. A streamed
        load still running is cancelled first (the daemon frees it)."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        follower = self._follower
        if follower is not None and follower is not threading.current_thread():
            if not self._complete and self._cancel is not None:
                self._cancel()
            # Until it is over, the load may still complete (and then the
            # daemon holds the model for this session, to be released).
            follower.join()
        self._shut()

    def _shut(self) -> None:
        self._arrays.clear()
        # Mappings no array or tensor holds go now (munmap on the last
        # reference); the others go with the last of those.
        self._maps = {}
        self._private_maps = {}
        self._holding.close()
        self._fds = {}

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
