"""The camera client against vivid, the kernel's virtual camera. Runs inside the VM only.

Boot with `--kernel-args "vivid.n_devs=2 vivid.multiplanar=1,2"` for a single-planar
and a multi-planar vivid; with the default (one single-planar instance) the NV12M
cases skip, saying so. Results go to $DMABUFD_VM_RESULTS/camera-*.json as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from dmabufd_camera import v4l2
from dmabufd_camera.capture import Capture, allocate_frames, stream
from dmabufd_client import Access
from dmabufd_common import formats
from tests.conftest import RunningDaemon

# vivid's webcam input (input 0, the default) offers these discrete sizes only.
SIZES = [(320, 180), (640, 480), (1280, 720)]
ALIGNS = [1, 256]
FRAME_SIZE = (640, 480)
RESULTS = Path(os.environ.get("DMABUFD_VM_RESULTS", "/tmp"))


def record(name: str, data: Any) -> None:
    with contextlib.suppress(OSError):
        (RESULTS / f"camera-{name}.json").write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def vivid() -> dict[str, str]:
    """'single' and/or 'multi' -> vivid's video capture node of that API."""
    nodes: dict[str, str] = {}
    for path, caps in v4l2.find_capture_devices("vivid"):
        nodes.setdefault("multi" if caps.multi_planar else "single", path)
    if not nodes:
        pytest.fail("no vivid capture node: the product kernel config enables CONFIG_VIDEO_VIVID")
    return nodes


def node_for(vivid: dict[str, str], fourcc: str) -> str:
    if formats.layout(fourcc, 64, 64).multi_planar:
        if "multi" not in vivid:
            pytest.skip(
                f"{fourcc} needs a multi-planar vivid: boot with vivid.n_devs=2 vivid.multiplanar=1,2 (have {vivid})"
            )
        return vivid["multi"]
    return vivid.get("single") or vivid["multi"]


# -- (a) layout maths against the kernel's own answer --------------------------


@pytest.mark.parametrize("fourcc", formats.supported_fourccs())
def test_layout_equals_what_vivid_sets(vivid: dict[str, str], fourcc: str) -> None:
    compared: list[dict[str, Any]] = []
    not_offered: list[str] = []
    for api, path in sorted(vivid.items()):
        with v4l2.Device(path) as device:
            buf_type = device.querycap().capture_type
            if fourcc not in device.enum_formats(buf_type):
                not_offered.append(f"{api} ({path})")
                continue
            for width, height in SIZES:
                for align in ALIGNS:
                    layout = formats.layout(fourcc, width, height, align)
                    # align 1: let vivid pick its minimum bytesperline; else ask for ours.
                    wanted = [stride for stride, _ in layout.v4l2_planes] if align > 1 else None
                    got = device.set_format(buf_type, fourcc, width, height, bytesperline=wanted)
                    kernel = [(p.bytesperline, p.sizeimage) for p in got.planes]
                    compared.append(
                        {
                            "api": api,
                            "size": f"{width}x{height}",
                            "align": align,
                            "ours": layout.v4l2_planes,
                            "kernel": kernel,
                        }
                    )
                    assert (got.fourcc, got.width, got.height) == (fourcc, width, height)
                    assert kernel == layout.v4l2_planes, f"{fourcc} {width}x{height} align {align} on {api}"
    record(f"layout-{fourcc}", {"compared": compared, "not_offered": not_offered})
    if not compared:
        pytest.skip(f"vivid does not offer {fourcc} on {', '.join(not_offered)}")


# -- (b) frames in dmabufd's dma-bufs equal the driver's own MMAP frames -------


def mmap_reference(path: str, fourcc: str, frames: int = 5) -> list[bytes]:
    """The planes of a frame captured into vivid's own buffers; every frame
    of the deterministic pattern must be the same."""
    width, height = FRAME_SIZE
    with Capture(path, fourcc, width, height) as cap:
        v4l2.make_deterministic(cap.device)
        maps = cap.use_mmap(4)
        cap.start()
        reference: list[bytes] | None = None
        for _ in range(frames):
            frame = cap.dequeue()
            assert not frame.error
            assert frame.bytesused == [size for _, size in cap.layout.v4l2_planes]
            planes = [maps[frame.index][p][:used] for p, used in enumerate(frame.bytesused)]
            if reference is None:
                reference = planes
            assert planes == reference, f"MMAP frame {frame.sequence} differs: vivid is not deterministic"
            cap.queue(frame.index)
    assert reference is not None
    assert all(len(set(plane[::97])) > 4 for plane in reference), "the pattern must not be flat"
    return reference


@pytest.fixture(scope="module")
def references() -> dict[str, list[bytes]]:
    """MMAP reference frames by fourcc, captured once per module."""
    return {}


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
@pytest.mark.parametrize("fourcc", ["YUYV", "NV12", "NM12"])
def test_dmabuf_frames_equal_mmap_frames(
    daemon: RunningDaemon, vivid: dict[str, str], references: dict[str, list[bytes]], fourcc: str, heap: str
) -> None:
    path = node_for(vivid, fourcc)
    if fourcc not in references:
        references[fourcc] = mmap_reference(path, fourcc)
    reference = references[fourcc]
    width, height = FRAME_SIZE
    verified = 0
    with Capture(path, fourcc, width, height) as cap, daemon.connect() as client:
        v4l2.make_deterministic(cap.device)
        pool = allocate_frames(client, cap.layout, 4, heap=heap)
        try:
            assert all(buffer.info.heap == heap and buffer.is_dma_buf for buffer in pool.buffers)
            assert len(pool.frames[0]) == len(cap.layout.buffer_sizes)
            cap.use_dmabufs(pool.frames)
            cap.start()
            for _ in range(8):
                frame = cap.dequeue()
                assert not frame.error
                for plane, (buffer, used) in enumerate(zip(pool.frames[frame.index], frame.bytesused, strict=True)):
                    assert used == len(reference[plane])
                    with buffer.map(Access.READ) as mapping:
                        view = mapping.memoryview
                        same = view[:used] == reference[plane]
                        del view
                    assert same, f"frame {frame.sequence} plane {plane} in {heap} differs from the MMAP capture"
                verified += 1
                cap.queue(frame.index)
            cap.stop()
        finally:
            pool.close()
    record(f"frames-{fourcc}-{heap}", {"verified": verified, "planes": [len(p) for p in reference]})
    assert verified == 8


# -- (c) the camera client end to end, with a consumer process -----------------


def reference_crc(planes: list[bytes]) -> int:
    crc = 0
    for plane in planes:
        crc = zlib.crc32(plane, crc)
    return crc


@pytest.mark.parametrize("heap", ["system", "udmabuf"])
@pytest.mark.parametrize("fourcc", ["YUYV", "NM12"])
def test_camera_client_with_consumer(
    daemon: RunningDaemon, vivid: dict[str, str], references: dict[str, list[bytes]], fourcc: str, heap: str
) -> None:
    path = node_for(vivid, fourcc)
    if fourcc not in references:
        references[fourcc] = mmap_reference(path, fourcc)
    frames = 30
    width, height = FRAME_SIZE
    started = time.monotonic()
    command = [
        sys.executable,
        "-m",
        "dmabufd_camera",
        "--device",
        path,
        "--format",
        fourcc,
        "--size",
        f"{width}x{height}",
        "--frames",
        str(frames),
        "--heap",
        heap,
        "--consumer",
        "--runtime-dir",
        str(daemon.runtime_dir),
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    result["wall_seconds"] = round(time.monotonic() - started, 2)
    record(f"client-{fourcc}-{heap}", result)
    print(
        f"\n{fourcc} {heap}: {result['frames']} frames, {result['dropped']} dropped, "
        f"{result['fps']:.1f} fps, consumer verified {result['consumer']['frames']}"
    )
    assert result["frames"] == frames
    assert result["errors"] == 0
    assert result["heap"] == heap
    consumer = result["consumer"]
    assert consumer["errors"] == []
    assert consumer["frames"] == frames
    # Every frame the consumer mapped is the frame vivid put in its own MMAP buffers.
    assert consumer["checksums"] == {str(reference_crc(references[fourcc])): frames}
    assert result["fps"] > 0


def test_stream_counts_sequence_gaps_as_drops(daemon: RunningDaemon, vivid: dict[str, str]) -> None:
    """With every buffer held by a slow reader vivid skips sequence numbers."""
    path = node_for(vivid, "YUYV")
    width, height = FRAME_SIZE
    with Capture(path, "YUYV", width, height) as cap, daemon.connect() as client:
        pool = allocate_frames(client, cap.layout, 2, heap="system")  # vivid's minimum
        try:
            cap.use_dmabufs(pool.frames)
            cap.start()
            held = [cap.dequeue(), cap.dequeue()]
            time.sleep(0.5)  # vivid keeps generating frames with nowhere to put them
            for frame in held:
                cap.queue(frame.index)
            after = cap.dequeue()
            assert after.sequence > held[1].sequence + 1
            cap.stop()
            cap.use_dmabufs(pool.frames)
            result = stream(cap, 3)
            assert result.frames == 3
            assert result.dropped == result.last_sequence - result.first_sequence - 2
        finally:
            pool.close()
