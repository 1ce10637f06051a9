"""Image layouts, checked against numbers worked out by hand from the V4L2
pixel-format pages (the VM test checks the same maths against vivid)."""

from __future__ import annotations

import pytest

from dmabufd_common import formats
from dmabufd_common.formats import PlaneLayout, layout


def planes(*triples: tuple[int, int, int]) -> list[PlaneLayout]:
    return [PlaneLayout(offset=o, stride=s, size=n) for o, s, n in triples]


# (fourcc, width, height, stride_align, expected planes as (offset, stride, size), total)
Case = tuple[str, int, int, int, list[tuple[int, int, int]], int]
CASES: list[Case] = [
    # YUYV: 2 bytes a pixel, pixels in pairs: an odd width rounds up to the even one.
    ("YUYV", 640, 480, 1, [(0, 1280, 614400)], 614400),
    ("YUYV", 641, 480, 1, [(0, 1284, 616320)], 616320),
    ("YUYV", 641, 480, 64, [(0, 1344, 645120)], 645120),
    # NV12/NV21: Y plane, then CbCr at the same stride and half the rows.
    ("NV12", 640, 480, 1, [(0, 640, 307200), (307200, 640, 153600)], 460800),
    ("NV21", 640, 480, 1, [(0, 640, 307200), (307200, 640, 153600)], 460800),
    # 641x481: stride 642 (321 CbCr pairs), 481 Y rows, ceil(481/2) = 241 CbCr rows.
    ("NV12", 641, 481, 1, [(0, 642, 308802), (308802, 642, 154722)], 463524),
    ("NV12", 641, 481, 256, [(0, 768, 369408), (369408, 768, 185088)], 554496),
    # NV12M: the same planes, one buffer each in V4L2's multi-planar API.
    ("NM12", 320, 180, 1, [(0, 320, 57600), (57600, 320, 28800)], 86400),
    ("NM12", 100, 50, 64, [(0, 128, 6400), (6400, 128, 3200)], 9600),
    # YUV420 ('YU12'): Y, then Cb and Cr at half the stride and half the rows.
    ("YU12", 640, 480, 1, [(0, 640, 307200), (307200, 320, 76800), (384000, 320, 76800)], 460800),
    ("YU12", 641, 481, 1, [(0, 642, 308802), (308802, 321, 77361), (386163, 321, 77361)], 463524),
    # stride_align=64 aligns the chroma strides too: Y stride to 128 (642 -> 768), Cb/Cr 384.
    ("YU12", 641, 481, 64, [(0, 768, 369408), (369408, 384, 92544), (461952, 384, 92544)], 554496),
    # RGB24 ('RGB3'): 3 bytes a pixel, no rounding of the width.
    ("RGB3", 641, 3, 1, [(0, 1923, 5769)], 5769),
    ("RGB3", 641, 3, 16, [(0, 1936, 5808)], 5808),
    # XRGB8888 ('XR24', V4L2's XBGR32): 4 bytes a pixel.
    ("XR24", 1920, 1080, 1, [(0, 7680, 8294400)], 8294400),
    ("XR24", 33, 2, 128, [(0, 256, 512)], 512),
    ("GREY", 1, 1, 1, [(0, 1, 1)], 1),
    ("GREY", 641, 481, 1, [(0, 641, 308321)], 308321),
    # Raw Bayer RGGB8: one byte a sample, odd sizes are not rounded.
    ("RGGB", 641, 481, 1, [(0, 641, 308321)], 308321),
    ("RGGB", 641, 481, 32, [(0, 672, 323232)], 323232),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-align{c[3]}" for c in CASES])
def test_layouts_worked_out_by_hand(case: Case) -> None:
    fourcc, width, height, align, expected, total = case
    result = layout(fourcc, width, height, stride_align=align)
    assert result.planes == planes(*expected)
    assert result.size == total
    assert (result.fourcc, result.width, result.height) == (fourcc, width, height)
    assert result.multi_planar == (fourcc == "NM12")
    for plane in result.planes:
        assert plane.stride % align == 0
        assert plane.size == plane.stride * plane.rows


def test_every_supported_format_has_a_case() -> None:
    assert {case[0] for case in CASES} == set(formats.supported_fourccs())


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [("NV12M", "NM12"), ("YUV420", "YU12"), ("rgb24", "RGB3"), ("XRGB8888", "XR24"), ("SRGGB8", "RGGB")],
)
def test_names_and_fourccs(alias: str, canonical: str) -> None:
    assert layout(alias, 64, 64) == layout(canonical, 64, 64)
    assert layout(alias, 64, 64).fourcc == canonical


def test_multi_planar_buffers_and_pixelformat() -> None:
    nv12m = layout("NV12M", 640, 480)
    assert nv12m.buffer_sizes == [307200, 153600]
    assert nv12m.v4l2_planes == [(640, 307200), (640, 153600)]
    assert layout("NV12", 640, 480).buffer_sizes == [460800]
    assert layout("YU12", 640, 480, 64).v4l2_planes == [(640, 460800)]
    assert layout("YUYV", 2, 2).pixelformat == 0x56595559  # v4l2_fourcc('Y','U','Y','V')
    assert formats.fourcc_str(0x3231564E) == "NV12"


def test_largest_image() -> None:
    assert layout("XR24", 16384, 16384).size == 16384 * 16384 * 4


@pytest.mark.parametrize("fourcc", ["ABCD", "MJPG", "", "YUYV2", "yuyv"])
def test_unknown_fourcc(fourcc: str) -> None:
    with pytest.raises(ValueError, match="unknown pixel format"):
        layout(fourcc, 640, 480)


@pytest.mark.parametrize(("width", "height"), [(0, 480), (640, 0), (-2, 480), (16385, 16), (16, 100000)])
def test_zero_or_absurd_dimensions(width: int, height: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 16384"):
        layout("NV12", width, height)


@pytest.mark.parametrize("align", [0, -64, 3, 48, 8192])
def test_bad_stride_alignment(align: int) -> None:
    with pytest.raises(ValueError, match="stride_align"):
        layout("GREY", 64, 64, stride_align=align)


def test_non_int_dimensions() -> None:
    with pytest.raises(ValueError, match="must be an int"):
        layout("GREY", 64.0, 64)  # type: ignore[arg-type]
