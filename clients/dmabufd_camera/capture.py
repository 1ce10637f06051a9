"""Capture from a V4L2 device into dmabufd buffers, optionally handing every
frame to a consumer process.

    with dmabufd_client.connect() as client, Capture("/dev/video0", "NV12", 640, 480) as cap:
        frames = allocate_frames(client, cap.layout, 4, heap="system")
        cap.use_dmabufs(frames)
        result = stream(cap, 30, consumer=True)

The frames stay in the dma-bufs: the driver writes them, the consumer maps
them. Python only moves the small ioctl structs and fd numbers.
"""

from __future__ import annotations

import json
import mmap
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dmabufd_client
from dmabufd_camera import v4l2
from dmabufd_client import Buffer, Client, Pool
from dmabufd_common import formats

# How long a capture may go without a frame (emulated machines are slow), and
# how long a consumer process may take to start and redeem its grant.
FRAME_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 120.0


class CaptureError(Exception):
    """The device cannot capture what was asked (format, size, buffers)."""


def allocate_frames(
    client: Client, layout: formats.ImageLayout, count: int, heap: str = "", stride_align: int = 1
) -> Pool:
    """A pool of `count` frames of `layout` from dmabufd: per frame, one dma-buf
    holding every plane, or one per plane for a multi-planar format (V4L2 capture
    cannot put two planes in one dma-buf). Kept warm on release, so a restarted
    pipeline gets its buffers back at once."""
    return client.allocate_pool(
        layout.fourcc,
        layout.width,
        layout.height,
        count,
        stride_align=stride_align,
        heap=heap,
        usage="camera",
        name="camera",
        recycle=True,
    )


@dataclass
class ConsumerReport:
    frames: int = 0
    checksums: dict[int, int] = field(default_factory=dict)  # crc32 of the frame's planes -> how many frames
    errors: list[str] = field(default_factory=list)


@dataclass
class CaptureResult:
    device: str
    driver: str
    fourcc: str
    width: int
    height: int
    memory: str
    heap: str
    buffers: int
    planes: list[tuple[int, int]]  # (bytesperline, sizeimage) per memory plane, as the driver set them
    frames: int = 0
    dropped: int = 0  # sequence gaps
    errors: int = 0  # buffers the driver flagged with V4L2_BUF_FLAG_ERROR
    seconds: float = 0.0
    fps: float = 0.0
    first_sequence: int = -1
    last_sequence: int = -1
    consumer: ConsumerReport | None = None
    # The dmabufd pool: came warm from a recycled one, and how long it took.
    pool_recycled: bool = False
    pool_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Capture:
    """A capture device set to one format; buffers come from use_dmabufs() or use_mmap()."""

    def __init__(self, device: str, fourcc: str, width: int, height: int, stride_align: int = 1) -> None:
        self.layout = formats.layout(fourcc, width, height, stride_align)
        self.device = v4l2.Device(device)
        try:
            self.caps = self.device.querycap()
            if not self.caps.video_capture:
                raise CaptureError(f"{device} ({self.caps.driver}) is not a video capture device")
            if not self.caps.device_caps & v4l2.CAP_STREAMING:
                raise CaptureError(f"{device} ({self.caps.driver}) cannot stream")
            self.buf_type = self.caps.capture_type
            if self.layout.multi_planar and self.buf_type != v4l2.BUF_TYPE_VIDEO_CAPTURE_MPLANE:
                raise CaptureError(f"{self.layout.fourcc} needs the multi-planar API, which {device} does not offer")
            offered = self.device.enum_formats(self.buf_type)
            if self.layout.fourcc not in offered:
                raise CaptureError(f"{device} ({self.caps.driver}) does not offer {self.layout.fourcc}: {offered}")
            wanted = self.layout.v4l2_planes
            self.format = self.device.set_format(
                self.buf_type, self.layout.fourcc, width, height, bytesperline=[stride for stride, _ in wanted]
            )
            got = [(plane.bytesperline, plane.sizeimage) for plane in self.format.planes]
            if (self.format.fourcc, self.format.width, self.format.height, got) != (
                self.layout.fourcc,
                width,
                height,
                wanted,
            ):
                raise CaptureError(
                    f"{device} set {self.format.fourcc} {self.format.width}x{self.format.height} planes {got} "
                    f"(bytesperline, sizeimage) for {self.layout.fourcc} {width}x{height} planes {wanted}; "
                    "a driver that pads lines may need --stride-align"
                )
        except BaseException:
            self.device.close()
            raise
        self.memory = 0
        self.count = 0
        self._dmabufs: list[list[int]] = []
        self._lengths: list[list[int]] = []
        self._mmaps: list[list[mmap.mmap]] = []
        self._streaming = False

    @property
    def num_planes(self) -> int:
        return len(self.format.planes)

    def use_dmabufs(self, frames: Sequence[Sequence[Buffer | int]], lengths: Sequence[Sequence[int]] = ()) -> None:
        """Import one dma-buf (or one per plane) per frame with V4L2_MEMORY_DMABUF."""
        self._dmabufs = [[b if isinstance(b, int) else b.fileno() for b in frame] for frame in frames]
        if lengths:
            self._lengths = [list(ls) for ls in lengths]
        else:
            self._lengths = [[0 if isinstance(b, int) else b.size for b in frame] for frame in frames]
        for frame in self._lengths:
            for length, (_, sizeimage) in zip(frame, self.layout.v4l2_planes, strict=True):
                if length and length < sizeimage:
                    raise CaptureError(f"a {length}-byte dma-buf cannot hold a {sizeimage}-byte plane")
        self.count = self.device.request_buffers(self.buf_type, v4l2.MEMORY_DMABUF, len(frames))
        self.memory = v4l2.MEMORY_DMABUF
        if self.count != len(frames):
            raise CaptureError(f"{self.device.path} took {self.count} DMABUF buffers of {len(frames)}")

    def use_mmap(self, count: int) -> list[list[mmap.mmap]]:
        """The driver's own buffers (V4L2_MEMORY_MMAP), mapped read-only."""
        self.count = self.device.request_buffers(self.buf_type, v4l2.MEMORY_MMAP, count)
        self.memory = v4l2.MEMORY_MMAP
        for index in range(self.count):
            planes = self.device.query_buffer(self.buf_type, index, self.num_planes)
            self._mmaps.append(
                [
                    mmap.mmap(self.device.fileno(), p.length, mmap.MAP_SHARED, mmap.PROT_READ, offset=p.offset)
                    for p in planes
                ]
            )
        return self._mmaps

    def dmabuf_fds(self, index: int) -> list[int]:
        """The dma-buf fds imported as buffer `index` (one per memory plane)."""
        return self._dmabufs[index]

    def queue(self, index: int) -> None:
        if self.memory == v4l2.MEMORY_DMABUF:
            self.device.queue_dmabuf(self.buf_type, index, self._dmabufs[index], self._lengths[index])
        else:
            self.device.queue_mmap(self.buf_type, index, self.num_planes)

    def start(self) -> None:
        for index in range(self.count):
            self.queue(index)
        self.device.stream_on(self.buf_type)
        self._streaming = True

    def dequeue(self, timeout_s: float = FRAME_TIMEOUT_S) -> v4l2.Dequeued:
        deadline = time.monotonic() + timeout_s
        while True:
            frame = self.device.dequeue(self.buf_type, self.memory, self.num_planes)
            if frame is not None:
                return frame
            left = deadline - time.monotonic()
            if left <= 0 or not self.device.wait(left):
                raise TimeoutError(f"no frame from {self.device.path} in {timeout_s} s")

    def stream_off(self) -> None:
        """STREAMOFF: every buffer comes back from the driver (queued ones unfilled)."""
        if self._streaming:
            self.device.stream_off(self.buf_type)
            self._streaming = False

    def stop(self) -> None:
        if self._streaming:
            self.device.stream_off(self.buf_type)
            self._streaming = False
        for planes in self._mmaps:
            for region in planes:
                region.close()
        self._mmaps = []
        if self.memory:
            self.device.request_buffers(self.buf_type, self.memory, 0)
            self.memory = 0

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.device.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the consumer: a second process that receives the pool through a dmabufd grant --


class ConsumerLink:
    """The producer's end of a consumer process. The pool reaches the consumer
    once, through a dmabufd grant it redeems on its own session (so it gets its
    own fds from the daemon); after that each frame is named by its index over a
    socketpair, as the Android camera HAL refers to a buffer by id once sent."""

    def __init__(self, client: Client, pool: Pool) -> None:
        grant = client.grant(pool)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dmabufd_camera.consumer", str(theirs.fileno())], pass_fds=[theirs.fileno()]
            )
        self.sock.send(json.dumps({"grant": grant.token, "runtime_dir": str(client.runtime_dir)}).encode())
        # Stream only once the consumer holds the pool: a consumer still
        # starting up would otherwise hold every buffer and stall capture.
        self.sock.settimeout(STARTUP_TIMEOUT_S)
        try:
            ready = self.receive()
        except (TimeoutError, ValueError):
            self.kill()
            raise CaptureError("the consumer did not redeem the pool's grant") from None
        finally:
            if self.sock.fileno() >= 0:
                self.sock.settimeout(None)
        if not ready.get("ready"):
            self.kill()
            raise CaptureError(f"the consumer could not take the pool: {ready.get('error', 'unknown')}")

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, frame: v4l2.Dequeued) -> None:
        header = {"index": frame.index, "sequence": frame.sequence, "bytesused": frame.bytesused}
        self.sock.send(json.dumps(header).encode())

    def receive(self) -> dict[str, Any]:
        return dict(json.loads(self.sock.recv(65536)))

    def finish(self, timeout_s: float = 30.0) -> ConsumerReport:
        self.sock.send(b'{"stop": true}')
        summary = self.receive()
        self.sock.close()
        if self.process.wait(timeout=timeout_s) != 0:
            raise CaptureError(f"the consumer exited with {self.process.returncode}")
        return ConsumerReport(
            frames=summary["frames"],
            checksums={int(k): v for k, v in summary["checksums"].items()},
            errors=summary["errors"],
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.sock.close()


def stream(
    cap: Capture, frames: int, consumer: tuple[Client, Pool] | None = None, timeout_s: float = FRAME_TIMEOUT_S
) -> CaptureResult:
    """Capture `frames` frames with the buffers already set up (use_dmabufs/use_mmap),
    requeueing each one, or once the consumer (given the client and the pool to
    grant it) has checked and released it."""
    if frames < 1:
        raise ValueError("frames must be at least 1")
    if consumer is not None and cap.memory != v4l2.MEMORY_DMABUF:
        raise CaptureError("the consumer gets dma-bufs: use_dmabufs() first")
    result = CaptureResult(
        device=cap.device.path,
        driver=cap.caps.driver,
        fourcc=cap.layout.fourcc,
        width=cap.layout.width,
        height=cap.layout.height,
        memory="dmabuf" if cap.memory == v4l2.MEMORY_DMABUF else "mmap",
        heap="",
        buffers=cap.count,
        planes=[(p.bytesperline, p.sizeimage) for p in cap.format.planes],
    )
    link = ConsumerLink(*consumer) if consumer is not None else None
    at_consumer: set[int] = set()
    poller = select.poll()
    poller.register(cap.device.fileno(), select.POLLIN)
    if link is not None:
        poller.register(link.fileno(), select.POLLIN)
    first_at = last_at = 0.0
    previous = -1
    try:
        cap.start()
        while result.frames < frames:
            events = poller.poll(int(timeout_s * 1000))
            if not events:
                raise TimeoutError(f"no frame from {cap.device.path} in {timeout_s} s")
            for fd, _ in events:
                if link is not None and fd == link.fileno():
                    released = link.receive()
                    at_consumer.discard(released["index"])
                    cap.queue(released["index"])
                    continue
                frame = cap.device.dequeue(cap.buf_type, cap.memory, cap.num_planes)
                if frame is None:
                    continue
                now = time.monotonic()
                if frame.error:
                    result.errors += 1
                    cap.queue(frame.index)
                    continue
                if previous >= 0 and frame.sequence > previous + 1:
                    result.dropped += frame.sequence - previous - 1
                previous = frame.sequence
                if result.frames == 0:
                    first_at, result.first_sequence = now, frame.sequence
                last_at, result.last_sequence = now, frame.sequence
                result.frames += 1
                if link is not None:
                    link.send(frame)
                    at_consumer.add(frame.index)
                else:
                    cap.queue(frame.index)
        cap.stream_off()
        if link is not None:
            while at_consumer:
                at_consumer.discard(link.receive()["index"])
            result.consumer = link.finish()
            link = None
    finally:
        if link is not None:
            link.kill()
    result.seconds = last_at - first_at
    result.fps = (result.frames - 1) / result.seconds if result.seconds > 0 else 0.0
    return result


def run(
    device: str,
    fourcc: str,
    width: int,
    height: int,
    *,
    frames: int = 30,
    buffers: int = 4,
    heap: str = "",
    consumer: bool = False,
    stride_align: int = 1,
    runtime_dir: str | None = None,
    deterministic: bool = True,
) -> CaptureResult:
    """The CLI's whole job: format, pool from dmabufd, stream, report."""
    with Capture(device, fourcc, width, height, stride_align) as cap:
        if deterministic and cap.caps.driver == "vivid":
            v4l2.make_deterministic(cap.device)
        with dmabufd_client.connect(runtime_dir) as client:
            pool = allocate_frames(client, cap.layout, buffers, heap, stride_align)
            try:
                cap.use_dmabufs(pool.frames)
                result = stream(cap, frames, consumer=(client, pool) if consumer else None)
                result.heap = pool.frames[0][0].info.heap
                result.pool_recycled = pool.recycled
                result.pool_seconds = pool.allocation_seconds
            finally:
                cap.stop()
                pool.close()
    return result
