"""The V4L2 ioctls a capture client needs, as plain ctypes structs.

Covers VIDIOC_QUERYCAP, ENUM_FMT, G/S/TRY_FMT (single- and multi-planar),
REQBUFS, QUERYBUF, QBUF/DQBUF for V4L2_MEMORY_MMAP and V4L2_MEMORY_DMABUF,
STREAMON/STREAMOFF, QUERYCTRL/QUERYMENU, G/S_CTRL, and a poll() wait.

The structs follow include/uapi/linux/videodev2.h for LP64 (x86-64 and arm64
share the layout and the generic _IOC encoding); each ioctl number is computed
from sizeof(struct) and checked at import against the number the kernel header
produces, so a struct of the wrong size cannot be sent. Only small control
structs cross into Python: frame data stays in the buffers.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
from dataclasses import dataclass

from dmabufd_common.formats import fourcc_code, fourcc_str

# -- ioctl encoding (include/uapi/asm-generic/ioctl.h, used by x86 and arm64) --

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_WRITE, _IOC_READ = 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument of {size} bytes does not fit the encoding")
    return (direction << _IOC_DIRSHIFT) | (ord("V") << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _ior(nr: int, struct: type[ctypes._CData]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iow(nr: int, struct: type[ctypes._CData]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes._CData]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


# -- constants (videodev2.h) --

BUF_TYPE_VIDEO_CAPTURE = 1
BUF_TYPE_VIDEO_CAPTURE_MPLANE = 9

MEMORY_MMAP = 1
MEMORY_USERPTR = 2
MEMORY_DMABUF = 4

FIELD_ANY = 0
FIELD_NONE = 1

CAP_VIDEO_CAPTURE = 0x00000001
CAP_VIDEO_CAPTURE_MPLANE = 0x00001000
CAP_TOUCH = 0x10000000
CAP_STREAMING = 0x04000000
CAP_DEVICE_CAPS = 0x80000000

BUF_FLAG_MAPPED = 0x00000001
BUF_FLAG_QUEUED = 0x00000002
BUF_FLAG_DONE = 0x00000004
BUF_FLAG_ERROR = 0x00000040

CTRL_FLAG_NEXT_CTRL = 0x80000000
CTRL_TYPE_MENU = 3

VIDEO_MAX_PLANES = 8

# Standard control ids (v4l2-controls.h) and vivid's own (drivers/media/test-drivers/vivid/vivid-ctrls.c).
CID_TEST_PATTERN = 0x009F0903  # V4L2_CID_IMAGE_PROC_CLASS_BASE + 3: for sensors that have it
VIVID_CID_TEST_PATTERN = 0x00F0F000  # "Test Pattern" (menu, tpg_pattern_strings)
VIVID_CID_OSD_TEXT_MODE = 0x00F0F001  # "OSD Text Mode": 0 all, 1 counters only, 2 none
VIVID_CID_HOR_MOVEMENT = 0x00F0F002
VIVID_CID_VERT_MOVEMENT = 0x00F0F003


# -- structs --


class Capability(ctypes.Structure):
    _fields_ = (
        ("driver", ctypes.c_char * 16),
        ("card", ctypes.c_char * 32),
        ("bus_info", ctypes.c_char * 32),
        ("version", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("device_caps", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 3),
    )


class FmtDesc(ctypes.Structure):
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("description", ctypes.c_char * 32),
        ("pixelformat", ctypes.c_uint32),
        ("mbus_code", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 3),
    )


class PixFormat(ctypes.Structure):
    _fields_ = (
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("pixelformat", ctypes.c_uint32),
        ("field", ctypes.c_uint32),
        ("bytesperline", ctypes.c_uint32),
        ("sizeimage", ctypes.c_uint32),
        ("colorspace", ctypes.c_uint32),
        ("priv", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("ycbcr_enc", ctypes.c_uint32),  # union with hsv_enc
        ("quantization", ctypes.c_uint32),
        ("xfer_func", ctypes.c_uint32),
    )


class PlanePixFormat(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("sizeimage", ctypes.c_uint32),
        ("bytesperline", ctypes.c_uint32),
        ("reserved", ctypes.c_uint16 * 6),
    )


class PixFormatMplane(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("pixelformat", ctypes.c_uint32),
        ("field", ctypes.c_uint32),
        ("colorspace", ctypes.c_uint32),
        ("plane_fmt", PlanePixFormat * VIDEO_MAX_PLANES),
        ("num_planes", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ycbcr_enc", ctypes.c_uint8),  # union with hsv_enc
        ("quantization", ctypes.c_uint8),
        ("xfer_func", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 7),
    )


class _FormatUnion(ctypes.Union):
    # struct v4l2_window in the kernel's union holds pointers: the union is 8-aligned.
    _fields_ = (
        ("pix", PixFormat),
        ("pix_mp", PixFormatMplane),
        ("raw_data", ctypes.c_uint8 * 200),
        ("_align", ctypes.c_void_p),
    )


class Format(ctypes.Structure):
    _fields_ = (("type", ctypes.c_uint32), ("fmt", _FormatUnion))


class RequestBuffers(ctypes.Structure):
    _fields_ = (
        ("count", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("memory", ctypes.c_uint32),
        ("capabilities", ctypes.c_uint32),
        ("flags", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
    )


class Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class Timecode(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("frames", ctypes.c_uint8),
        ("seconds", ctypes.c_uint8),
        ("minutes", ctypes.c_uint8),
        ("hours", ctypes.c_uint8),
        ("userbits", ctypes.c_uint8 * 4),
    )


class _PlaneM(ctypes.Union):
    _fields_ = (("mem_offset", ctypes.c_uint32), ("userptr", ctypes.c_ulong), ("fd", ctypes.c_int32))


class Plane(ctypes.Structure):
    _fields_ = (
        ("bytesused", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
        ("m", _PlaneM),
        ("data_offset", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 11),
    )


class _BufferM(ctypes.Union):
    _fields_ = (
        ("offset", ctypes.c_uint32),
        ("userptr", ctypes.c_ulong),
        ("planes", ctypes.POINTER(Plane)),
        ("fd", ctypes.c_int32),
    )


class Buffer(ctypes.Structure):
    _fields_ = (
        ("index", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("bytesused", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("field", ctypes.c_uint32),
        ("timestamp", Timeval),
        ("timecode", Timecode),
        ("sequence", ctypes.c_uint32),
        ("memory", ctypes.c_uint32),
        ("m", _BufferM),
        ("length", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint32),
        ("request_fd", ctypes.c_int32),  # union with reserved
    )


class Control(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint32), ("value", ctypes.c_int32))


class QueryCtrl(ctypes.Structure):
    _fields_ = (
        ("id", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("name", ctypes.c_char * 32),
        ("minimum", ctypes.c_int32),
        ("maximum", ctypes.c_int32),
        ("step", ctypes.c_int32),
        ("default_value", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 2),
    )


class _MenuName(ctypes.Union):
    _pack_ = 1
    _fields_ = (("name", ctypes.c_char * 32), ("value", ctypes.c_int64))


class QueryMenu(ctypes.Structure):
    _pack_ = 1
    _fields_ = (
        ("id", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("u", _MenuName),
        ("reserved", ctypes.c_uint32),
    )


_Int = ctypes.c_int

VIDIOC_QUERYCAP = _ior(0, Capability)
VIDIOC_ENUM_FMT = _iowr(2, FmtDesc)
VIDIOC_G_FMT = _iowr(4, Format)
VIDIOC_S_FMT = _iowr(5, Format)
VIDIOC_REQBUFS = _iowr(8, RequestBuffers)
VIDIOC_QUERYBUF = _iowr(9, Buffer)
VIDIOC_QBUF = _iowr(15, Buffer)
VIDIOC_DQBUF = _iowr(17, Buffer)
VIDIOC_STREAMON = _iow(18, _Int)
VIDIOC_STREAMOFF = _iow(19, _Int)
VIDIOC_G_CTRL = _iowr(27, Control)
VIDIOC_S_CTRL = _iowr(28, Control)
VIDIOC_QUERYCTRL = _iowr(36, QueryCtrl)
VIDIOC_QUERYMENU = _iowr(37, QueryMenu)
VIDIOC_TRY_FMT = _iowr(64, Format)

# The numbers the kernel's headers give on LP64 (x86-64, arm64): a struct of the
# wrong size changes the encoded number, and this module refuses to load.
_KERNEL_NUMBERS = {
    "VIDIOC_QUERYCAP": 0x80685600,
    "VIDIOC_ENUM_FMT": 0xC0405602,
    "VIDIOC_G_FMT": 0xC0D05604,
    "VIDIOC_S_FMT": 0xC0D05605,
    "VIDIOC_REQBUFS": 0xC0145608,
    "VIDIOC_QUERYBUF": 0xC0585609,
    "VIDIOC_QBUF": 0xC058560F,
    "VIDIOC_DQBUF": 0xC0585611,
    "VIDIOC_STREAMON": 0x40045612,
    "VIDIOC_STREAMOFF": 0x40045613,
    "VIDIOC_G_CTRL": 0xC008561B,
    "VIDIOC_S_CTRL": 0xC008561C,
    "VIDIOC_QUERYCTRL": 0xC0445624,
    "VIDIOC_QUERYMENU": 0xC02C5625,
    "VIDIOC_TRY_FMT": 0xC0D05640,
}
if ctypes.sizeof(ctypes.c_void_p) != 8:
    raise ImportError("dmabufd_camera.v4l2 describes the LP64 (64-bit) V4L2 ABI only")
for _name, _number in _KERNEL_NUMBERS.items():
    if globals()[_name] != _number:
        raise ImportError(f"{_name}: struct size gives {globals()[_name]:#x}, the kernel header {_number:#x}")
_SIZES = {Plane: 64, PixFormatMplane: 192, PlanePixFormat: 20, Timeval: 16, Buffer: 88, Format: 208}
for _struct, _size in _SIZES.items():
    if ctypes.sizeof(_struct) != _size:
        raise ImportError(f"struct {_struct.__name__}: {ctypes.sizeof(_struct)} bytes, the kernel's {_size}")


# -- typed results --


@dataclass(frozen=True)
class DeviceCaps:
    driver: str
    card: str
    bus_info: str
    capabilities: int
    device_caps: int

    @property
    def video_capture(self) -> bool:
        return bool(self.device_caps & (CAP_VIDEO_CAPTURE | CAP_VIDEO_CAPTURE_MPLANE)) and not (
            self.device_caps & CAP_TOUCH
        )

    @property
    def multi_planar(self) -> bool:
        return bool(self.device_caps & CAP_VIDEO_CAPTURE_MPLANE)

    @property
    def capture_type(self) -> int:
        return BUF_TYPE_VIDEO_CAPTURE_MPLANE if self.multi_planar else BUF_TYPE_VIDEO_CAPTURE


@dataclass(frozen=True)
class PlaneFormat:
    bytesperline: int
    sizeimage: int


@dataclass(frozen=True)
class ImageFormat:
    buf_type: int
    width: int
    height: int
    fourcc: str
    field: int
    planes: list[PlaneFormat]  # one per memory plane (one for single-planar)

    @property
    def multi_planar(self) -> bool:
        return self.buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE


@dataclass(frozen=True)
class Dequeued:
    index: int
    sequence: int
    flags: int
    bytesused: list[int]  # per memory plane
    timestamp_s: float

    @property
    def error(self) -> bool:
        return bool(self.flags & BUF_FLAG_ERROR)


@dataclass(frozen=True)
class MmapPlane:
    offset: int  # the mmap() offset for this plane
    length: int


# -- the device --


def _ioctl(fd: int, request: int, arg: ctypes._CData) -> None:
    while True:
        try:
            fcntl.ioctl(fd, request, arg, True)
            return
        except InterruptedError:
            continue


class Device:
    """An open V4L2 video node (non-blocking; wait() with a timeout before dequeue())."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        # Mplane dequeues need a planes array that outlives the ioctl.
        self._dq_planes = (Plane * VIDEO_MAX_PLANES)()

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.path} is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # capabilities and formats

    def querycap(self) -> DeviceCaps:
        cap = Capability()
        _ioctl(self.fileno(), VIDIOC_QUERYCAP, cap)
        device_caps = cap.device_caps if cap.capabilities & CAP_DEVICE_CAPS else cap.capabilities
        return DeviceCaps(
            driver=cap.driver.decode(errors="replace"),
            card=cap.card.decode(errors="replace"),
            bus_info=cap.bus_info.decode(errors="replace"),
            capabilities=cap.capabilities,
            device_caps=device_caps,
        )

    def enum_formats(self, buf_type: int) -> list[str]:
        fourccs: list[str] = []
        index = 0
        while True:
            desc = FmtDesc(index=index, type=buf_type)
            try:
                _ioctl(self.fileno(), VIDIOC_ENUM_FMT, desc)
            except OSError as error:
                if error.errno == errno.EINVAL:
                    return fourccs
                raise
            fourccs.append(fourcc_str(desc.pixelformat))
            index += 1

    @staticmethod
    def _decode(fmt: Format) -> ImageFormat:
        if fmt.type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            mp = fmt.fmt.pix_mp
            planes = [
                PlaneFormat(mp.plane_fmt[i].bytesperline, mp.plane_fmt[i].sizeimage) for i in range(mp.num_planes)
            ]
            return ImageFormat(fmt.type, mp.width, mp.height, fourcc_str(mp.pixelformat), mp.field, planes)
        pix = fmt.fmt.pix
        return ImageFormat(
            fmt.type,
            pix.width,
            pix.height,
            fourcc_str(pix.pixelformat),
            pix.field,
            [PlaneFormat(pix.bytesperline, pix.sizeimage)],
        )

    def get_format(self, buf_type: int) -> ImageFormat:
        fmt = Format(type=buf_type)
        _ioctl(self.fileno(), VIDIOC_G_FMT, fmt)
        return self._decode(fmt)

    def set_format(
        self,
        buf_type: int,
        fourcc: str,
        width: int,
        height: int,
        *,
        bytesperline: list[int] | None = None,
        try_only: bool = False,
    ) -> ImageFormat:
        """VIDIOC_S_FMT (or TRY_FMT): the driver's answer, which may differ from the request."""
        fmt = Format(type=buf_type)
        strides = bytesperline or []
        if buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            mp = fmt.fmt.pix_mp
            mp.width, mp.height, mp.pixelformat, mp.field = width, height, fourcc_code(fourcc), FIELD_NONE
            mp.num_planes = max(1, len(strides))
            for i, stride in enumerate(strides):
                mp.plane_fmt[i].bytesperline = stride
        else:
            pix = fmt.fmt.pix
            pix.width, pix.height, pix.pixelformat, pix.field = width, height, fourcc_code(fourcc), FIELD_NONE
            if strides:
                pix.bytesperline = strides[0]
        _ioctl(self.fileno(), VIDIOC_TRY_FMT if try_only else VIDIOC_S_FMT, fmt)
        return self._decode(fmt)

    # buffers

    def request_buffers(self, buf_type: int, memory: int, count: int) -> int:
        """VIDIOC_REQBUFS; count 0 frees the queue's buffers. Returns the count granted."""
        req = RequestBuffers(count=count, type=buf_type, memory=memory)
        _ioctl(self.fileno(), VIDIOC_REQBUFS, req)
        return int(req.count)

    def query_buffer(self, buf_type: int, index: int, num_planes: int = 1) -> list[MmapPlane]:
        """VIDIOC_QUERYBUF of an MMAP buffer: each plane's mmap offset and length."""
        buf = Buffer(index=index, type=buf_type, memory=MEMORY_MMAP)
        planes = (Plane * VIDEO_MAX_PLANES)()
        if buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            buf.m.planes = planes
            buf.length = num_planes
        _ioctl(self.fileno(), VIDIOC_QUERYBUF, buf)
        if buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            return [MmapPlane(planes[i].m.mem_offset, planes[i].length) for i in range(buf.length)]
        return [MmapPlane(buf.m.offset, buf.length)]

    def queue_mmap(self, buf_type: int, index: int, num_planes: int = 1) -> None:
        buf = Buffer(index=index, type=buf_type, memory=MEMORY_MMAP)
        planes = (Plane * VIDEO_MAX_PLANES)()
        if buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            buf.m.planes = planes
            buf.length = num_planes
        _ioctl(self.fileno(), VIDIOC_QBUF, buf)

    def queue_dmabuf(self, buf_type: int, index: int, fds: list[int], lengths: list[int]) -> None:
        """Queue dma-bufs for buffer `index`: one fd for a single-planar format, one
        per memory plane for a multi-planar one. `lengths` are the dma-bufs' sizes
        (0 lets the kernel use the whole dma-buf). Capture queues ignore a
        data_offset from userspace (vb2 resets it), so each plane is its own dma-buf."""
        if len(fds) != len(lengths) or not fds:
            raise ValueError("queue_dmabuf needs one length per fd")
        buf = Buffer(index=index, type=buf_type, memory=MEMORY_DMABUF)
        planes = (Plane * VIDEO_MAX_PLANES)()
        if buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            for i, (fd, length) in enumerate(zip(fds, lengths, strict=True)):
                planes[i].m.fd = fd
                planes[i].length = length
            buf.m.planes = planes
            buf.length = len(fds)
        else:
            if len(fds) != 1:
                raise ValueError("a single-planar buffer takes one dma-buf")
            buf.m.fd = fds[0]
            buf.length = lengths[0]
        _ioctl(self.fileno(), VIDIOC_QBUF, buf)

    def dequeue(self, buf_type: int, memory: int, num_planes: int = 1) -> Dequeued | None:
        """VIDIOC_DQBUF; None when no buffer is ready (the device is non-blocking)."""
        buf = Buffer(type=buf_type, memory=memory)
        if buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            buf.m.planes = self._dq_planes
            buf.length = num_planes
        try:
            _ioctl(self.fileno(), VIDIOC_DQBUF, buf)
        except BlockingIOError:
            return None
        if buf_type == BUF_TYPE_VIDEO_CAPTURE_MPLANE:
            used = [self._dq_planes[i].bytesused for i in range(buf.length)]
        else:
            used = [buf.bytesused]
        stamp = buf.timestamp.tv_sec + buf.timestamp.tv_usec / 1e6
        return Dequeued(int(buf.index), int(buf.sequence), int(buf.flags), used, stamp)

    def wait(self, timeout_s: float) -> bool:
        """Wait until a buffer can be dequeued; False on timeout."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN | select.POLLPRI)
        events = poller.poll(max(0, int(timeout_s * 1000)))
        return any(event & select.POLLIN for _, event in events)

    def stream_on(self, buf_type: int) -> None:
        _ioctl(self.fileno(), VIDIOC_STREAMON, ctypes.c_int(buf_type))

    def stream_off(self, buf_type: int) -> None:
        _ioctl(self.fileno(), VIDIOC_STREAMOFF, ctypes.c_int(buf_type))

    # controls

    def controls(self) -> dict[str, QueryCtrl]:
        """Every control by name (VIDIOC_QUERYCTRL with V4L2_CTRL_FLAG_NEXT_CTRL)."""
        found: dict[str, QueryCtrl] = {}
        next_id = CTRL_FLAG_NEXT_CTRL
        while True:
            query = QueryCtrl(id=next_id)
            try:
                _ioctl(self.fileno(), VIDIOC_QUERYCTRL, query)
            except OSError as error:
                if error.errno == errno.EINVAL:
                    return found
                raise
            found[query.name.decode(errors="replace")] = query
            next_id = query.id | CTRL_FLAG_NEXT_CTRL

    def menu(self, control_id: int) -> dict[str, int]:
        """A menu control's entries: name -> index."""
        query = QueryCtrl(id=control_id)
        _ioctl(self.fileno(), VIDIOC_QUERYCTRL, query)
        entries = {}
        for index in range(query.minimum, query.maximum + 1):
            item = QueryMenu(id=control_id, index=index)
            try:
                _ioctl(self.fileno(), VIDIOC_QUERYMENU, item)
            except OSError as error:
                if error.errno == errno.EINVAL:  # a hole in the menu
                    continue
                raise
            entries[item.u.name.decode(errors="replace")] = index
        return entries

    def get_control(self, control_id: int) -> int:
        ctrl = Control(id=control_id)
        _ioctl(self.fileno(), VIDIOC_G_CTRL, ctrl)
        return int(ctrl.value)

    def set_control(self, control_id: int, value: int) -> int:
        ctrl = Control(id=control_id, value=value)
        _ioctl(self.fileno(), VIDIOC_S_CTRL, ctrl)
        return int(ctrl.value)


def find_capture_devices(driver: str | None = None) -> list[tuple[str, DeviceCaps]]:
    """Video capture nodes under /dev (optionally of one driver), sorted by name."""
    found = []
    names = sorted(
        (name for name in os.listdir("/dev") if name.startswith("video") and name[5:].isdigit()),
        key=lambda name: int(name[5:]),
    )
    for name in names:
        path = f"/dev/{name}"
        try:
            with Device(path) as device:
                caps = device.querycap()
        except OSError:
            continue
        if caps.video_capture and (driver is None or caps.driver == driver):
            found.append((path, caps))
    return found


def make_deterministic(device: Device, pattern: str = "100% Color Squares") -> dict[str, int]:
    """For vivid: a fixed test pattern, no OSD text (counters, timestamps), no
    movement, so that every frame is the same. Returns what was set."""
    done: dict[str, int] = {}
    controls = device.controls()
    if "Test Pattern" in controls:
        control = controls["Test Pattern"]
        entries = device.menu(control.id)
        if pattern not in entries:
            raise ValueError(f"test pattern {pattern!r} not offered; the device has {sorted(entries)}")
        done["Test Pattern"] = device.set_control(control.id, entries[pattern])
    for name, wanted in (
        ("OSD Text Mode", "None"),
        ("Horizontal Movement", "No Movement"),
        ("Vertical Movement", "No Movement"),
    ):
        if name in controls:
            entries = device.menu(controls[name].id)
            done[name] = device.set_control(controls[name].id, entries[wanted])
    return done
