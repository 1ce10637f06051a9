"""Image layouts the way V4L2 and DRM define them: planes, strides, sizes.

Standard library only: the daemon imports this module for its image-pool API.

    layout("NV12", 640, 480)              # one buffer, Y at 0, CbCr at 307200
    layout("NM12", 640, 480)              # NV12M: two planes, multi_planar=True
    layout("YUYV", 641, 480, stride_align=64)

Rules (docs/camera.md has the long form):

* plane 0's stride is ``ceil(width / hsub) * hsub * bytes_per_pixel`` rounded up to
  ``stride_align``: subsampled formats (4:2:2, 4:2:0) round an odd width up to the
  even one, so the chroma samples of the last column have room (a chroma plane is
  ``ceil(width / 2)`` samples wide);
* a plane holds ``ceil(height / vdiv)`` rows: the luma plane ``height``, a 4:2:0 chroma
  plane ``ceil(height / 2)`` (an odd height's last chroma row serves one luma row);
* V4L2's single-buffer formats carry one ``bytesperline``: the other planes' strides
  derive from it (NV12/NV21 chroma = plane 0's stride, YUV420 chroma = half of it).
  With ``stride_align`` > 1, plane 0 is aligned enough for the derived strides to be
  aligned too (YUV420: plane 0 to ``2 * stride_align``);
* multi-planar formats (NV12M) have one ``bytesperline`` per plane, each aligned;
* planes follow each other without gaps: ``offset[i+1] = offset[i] + size[i]``, and
  ``size`` is the sum: one buffer holding every plane. A multi-planar format is
  normally one buffer per plane (``buffer_sizes``): V4L2 capture queues ignore the
  ``data_offset`` userspace gives, so planes cannot share a dma-buf there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_DIMENSION = 16384
MAX_STRIDE_ALIGN = 4096


@dataclass(frozen=True)
class PlaneLayout:
    offset: int  # bytes from the start of the one buffer holding all planes
    stride: int  # bytes per line (V4L2 bytesperline, DRM pitch)
    size: int  # stride * rows

    @property
    def rows(self) -> int:
        return self.size // self.stride


@dataclass(frozen=True)
class ImageLayout:
    fourcc: str  # the canonical V4L2 fourcc, e.g. "NM12" for NV12M
    width: int
    height: int
    planes: list[PlaneLayout]
    size: int  # one buffer holding all planes at their offsets
    multi_planar: bool  # V4L2 multi-planar format: one memory plane (buffer) per plane

    @property
    def pixelformat(self) -> int:
        """The fourcc as V4L2's u32 (little-endian characters)."""
        return fourcc_code(self.fourcc)

    @property
    def v4l2_planes(self) -> list[tuple[int, int]]:
        """(bytesperline, sizeimage) per memory plane, as VIDIOC_S_FMT reports them:
        one per plane for multi-planar formats, else plane 0's stride and the total."""
        if self.multi_planar:
            return [(plane.stride, plane.size) for plane in self.planes]
        return [(self.planes[0].stride, self.size)]

    @property
    def buffer_sizes(self) -> list[int]:
        """Bytes per memory buffer: one per plane for multi-planar formats,
        else the single buffer holding every plane."""
        return [plane.size for plane in self.planes] if self.multi_planar else [self.size]


@dataclass(frozen=True)
class _Format:
    fourcc: str
    name: str
    # Per plane: bytes per sample, column divisor, row divisor; a plane's minimum
    # stride = padded_width / hdiv * bpp, its rows = ceil(height / vdiv).
    plane_bpp: tuple[int, ...]
    hdiv: tuple[int, ...]
    vdiv: tuple[int, ...]
    hsub: int  # width granularity the format rounds to
    multi_planar: bool = False
    # Single-buffer formats with several planes: plane i's stride = plane 0's * num / den.
    derived_stride: tuple[tuple[int, int], ...] = ()


_FORMATS: dict[str, _Format] = {
    f.fourcc: f
    for f in (
        # Packed YUV 4:2:2: Y0 Cb Y1 Cr, 2 bytes a pixel, pixels in pairs.
        _Format("YUYV", "YUYV 4:2:2", (2,), (1,), (1,), hsub=2),
        # Y plane, then interleaved CbCr (NV12) or CrCb (NV21) at half height.
        _Format("NV12", "NV12 4:2:0", (1, 2), (1, 2), (1, 2), hsub=2, derived_stride=((1, 1), (1, 1))),
        _Format("NV21", "NV21 4:2:0", (1, 2), (1, 2), (1, 2), hsub=2, derived_stride=((1, 1), (1, 1))),
        _Format("NM12", "NV12M 4:2:0 (multi-planar)", (1, 2), (1, 2), (1, 2), hsub=2, multi_planar=True),
        # Y, Cb, Cr planes; chroma at half width and half height.
        _Format(
            "YU12",
            "YUV420 planar",
            (1, 1, 1),
            (1, 2, 2),
            (1, 2, 2),
            hsub=2,
            derived_stride=((1, 1), (1, 2), (1, 2)),
        ),
        _Format("RGB3", "RGB24", (3,), (1,), (1,), hsub=1),
        # V4L2_PIX_FMT_XBGR32 'XR24' = DRM_FORMAT_XRGB8888: B G R X in memory.
        _Format("XR24", "XRGB8888", (4,), (1,), (1,), hsub=1),
        _Format("GREY", "GREY 8-bit", (1,), (1,), (1,), hsub=1),
        # Raw Bayer RGGB, one byte a sample; no rounding (the CFA is a sensor property).
        _Format("RGGB", "SRGGB8 Bayer", (1,), (1,), (1,), hsub=1),
    )
}

_ALIASES = {
    "NV12M": "NM12",
    "YUV420": "YU12",
    "I420": "YU12",
    "RGB24": "RGB3",
    "XRGB8888": "XR24",
    "XBGR32": "XR24",
    "SRGGB8": "RGGB",
}


def supported_fourccs() -> list[str]:
    """The canonical fourccs layout() accepts."""
    return list(_FORMATS)


def canonical_fourcc(fourcc: str) -> str:
    """'NV12M' -> 'NM12', 'YUV420' -> 'YU12', ...; ValueError if unknown."""
    if fourcc in _FORMATS:
        return fourcc
    alias = _ALIASES.get(fourcc.upper())
    if alias is None:
        known = ", ".join(f"{code} ({_FORMATS[code].name})" for code in _FORMATS)
        raise ValueError(f"unknown pixel format {fourcc!r}; supported: {known}")
    return alias


def fourcc_code(fourcc: str) -> int:
    """'YUYV' -> 0x56595559, as v4l2_fourcc() builds it."""
    raw = fourcc.encode("ascii")
    if len(raw) != 4:
        raise ValueError(f"a fourcc has four characters, not {fourcc!r}")
    return int.from_bytes(raw, "little")


def fourcc_str(code: int) -> str:
    return code.to_bytes(4, "little").decode("ascii", errors="replace")


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _check_dimension(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1 or value > MAX_DIMENSION:
        raise ValueError(f"{name} must be between 1 and {MAX_DIMENSION} pixels, not {value}")


def layout(fourcc: str, width: int, height: int, stride_align: int = 1) -> ImageLayout:
    """The planes of a `width` x `height` image in `fourcc`, each plane's stride
    a multiple of `stride_align` bytes (a power of two up to 4096)."""
    fmt = _FORMATS[canonical_fourcc(fourcc)]
    _check_dimension("width", width)
    _check_dimension("height", height)
    if (
        not isinstance(stride_align, int)
        or stride_align < 1
        or stride_align > MAX_STRIDE_ALIGN
        or stride_align & (stride_align - 1)
    ):
        raise ValueError(f"stride_align must be a power of two between 1 and {MAX_STRIDE_ALIGN}, not {stride_align!r}")
    padded_width = _align(width, fmt.hsub)
    min_strides = [padded_width // hdiv * bpp for bpp, hdiv in zip(fmt.plane_bpp, fmt.hdiv, strict=True)]
    rows = [-(-height // vdiv) for vdiv in fmt.vdiv]
    if fmt.derived_stride:
        # One bytesperline for the buffer: the other planes' strides follow plane 0's.
        # Plane 0 must be wide enough for each derived plane and aligned so they align.
        base_align = stride_align
        base = min_strides[0]
        for minimum, (num, den) in zip(min_strides, fmt.derived_stride, strict=True):
            base = max(base, -(-minimum * den // num))
            base_align = math.lcm(base_align, stride_align * den // math.gcd(num, den))
        base = _align(base, base_align)
        strides = [base * num // den for num, den in fmt.derived_stride]
    else:
        strides = [_align(minimum, stride_align) for minimum in min_strides]
    planes = []
    offset = 0
    for stride, count in zip(strides, rows, strict=True):
        planes.append(PlaneLayout(offset=offset, stride=stride, size=stride * count))
        offset += stride * count
    return ImageLayout(
        fourcc=fmt.fourcc,
        width=width,
        height=height,
        planes=planes,
        size=offset,
        multi_planar=fmt.multi_planar,
    )
