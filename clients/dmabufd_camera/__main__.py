"""python -m dmabufd_camera --device /dev/video0 --format YUYV --size 640x480 --frames 30
[--heap system] [--consumer] [--buffers 4] [--stride-align N] [--json]"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dmabufd_camera import capture, v4l2
from dmabufd_common import formats


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is WIDTHxHEIGHT, not {text!r}") from None
    return width, height


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dmabufd_camera", description=__doc__)
    p.add_argument("--device", help="V4L2 capture node (default: the first capture device found)")
    p.add_argument("--format", default="YUYV", help=f"fourcc or name; one of {', '.join(formats.supported_fourccs())}")
    p.add_argument("--size", type=_size, default=(640, 480), help="WIDTHxHEIGHT (default 640x480)")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--buffers", type=int, default=4, help="frames in the pool (default 4)")
    p.add_argument("--heap", default="", help="dmabufd heap (default: the daemon's choice for usage 'camera')")
    p.add_argument("--stride-align", type=int, default=1, help="bytes each line is padded to (power of two)")
    p.add_argument("--consumer", action="store_true", help="hand every frame to a second process that checks it")
    p.add_argument("--runtime-dir", help="dmabufd's runtime dir (default: the client's default)")
    p.add_argument("--keep-osd", action="store_true", help="leave vivid's test pattern and OSD as they are")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device
    if device is None:
        found = v4l2.find_capture_devices()
        if not found:
            print("no V4L2 capture device found under /dev", file=sys.stderr)
            return 2
        device = found[0][0]
    width, height = args.size
    try:
        result = capture.run(
            device,
            args.format,
            width,
            height,
            frames=args.frames,
            buffers=args.buffers,
            heap=args.heap,
            consumer=args.consumer,
            stride_align=args.stride_align,
            runtime_dir=args.runtime_dir,
            deterministic=not args.keep_osd,
        )
    except (ValueError, capture.CaptureError, TimeoutError, OSError) as error:
        print(f"dmabufd_camera: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(
            f"{result.device} ({result.driver}) {result.fourcc} {result.width}x{result.height} "
            f"into {result.buffers} {result.heap} dma-bufs: {result.frames} frames, "
            f"{result.dropped} dropped, {result.errors} errors, {result.fps:.1f} fps over {result.seconds:.2f} s"
        )
        if result.consumer is not None:
            c = result.consumer
            print(f"consumer: {c.frames} frames checked, {len(c.checksums)} distinct checksums, {len(c.errors)} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
