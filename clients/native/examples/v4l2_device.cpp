#include "v4l2_device.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstring>

namespace v4l2 {

Error::Error(const std::string& what, int error_number)
    : std::runtime_error(what + ": " + std::strerror(error_number)), errno_(error_number) {}

std::string fourcc_string(std::uint32_t code) {
    std::string text(4, ' ');
    for (int i = 0; i < 4; ++i) {
        text[static_cast<std::size_t>(i)] = static_cast<char>((code >> (8 * i)) & 0xff);
    }
    return text;
}

std::uint32_t fourcc_code(const std::string& fourcc) {
    if (fourcc.size() != 4) {
        throw std::invalid_argument("a fourcc has four characters: " + fourcc);
    }
    return v4l2_fourcc(fourcc[0], fourcc[1], fourcc[2], fourcc[3]);
}

Device::Device(const std::string& path) : path_(path), fd_(::open(path.c_str(), O_RDWR | O_NONBLOCK | O_CLOEXEC)) {
    if (!fd_) {
        throw Error("open " + path, errno);
    }
    v4l2_capability capability{};
    ioctl_or_throw(VIDIOC_QUERYCAP, &capability, "VIDIOC_QUERYCAP");
    driver_ = reinterpret_cast<const char*>(capability.driver);
    const std::uint32_t caps =
        (capability.capabilities & V4L2_CAP_DEVICE_CAPS) != 0 ? capability.device_caps : capability.capabilities;
    if ((caps & V4L2_CAP_STREAMING) == 0 ||
        (caps & (V4L2_CAP_VIDEO_CAPTURE | V4L2_CAP_VIDEO_CAPTURE_MPLANE)) == 0) {
        throw std::invalid_argument(path + " (" + driver_ + ") is not a streaming video capture device");
    }
    type_ = (caps & V4L2_CAP_VIDEO_CAPTURE_MPLANE) != 0 ? V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE
                                                         : V4L2_BUF_TYPE_VIDEO_CAPTURE;
}

void Device::ioctl_or_throw(unsigned long request, void* argument, const char* name) {
    while (::ioctl(fd_.get(), request, argument) < 0) {
        if (errno != EINTR) {
            throw Error(std::string(name) + " on " + path_, errno);
        }
    }
}

std::vector<std::string> Device::formats() {
    std::vector<std::string> found;
    for (std::uint32_t index = 0;; ++index) {
        v4l2_fmtdesc description{};
        description.index = index;
        description.type = type_;
        if (::ioctl(fd_.get(), VIDIOC_ENUM_FMT, &description) < 0) {
            if (errno == EINTR) {
                --index;
                continue;
            }
            return found;  // EINVAL: past the last one
        }
        found.push_back(fourcc_string(description.pixelformat));
    }
}

Format Device::set_format(const std::string& fourcc, std::uint32_t width, std::uint32_t height,
                          const std::vector<std::uint32_t>& bytesperline) {
    v4l2_format format{};
    format.type = type_;
    if (multi_planar()) {
        v4l2_pix_format_mplane& mp = format.fmt.pix_mp;
        mp.width = width;
        mp.height = height;
        mp.pixelformat = fourcc_code(fourcc);
        mp.field = V4L2_FIELD_NONE;
        mp.num_planes = static_cast<std::uint8_t>(bytesperline.size());
        for (std::size_t i = 0; i < bytesperline.size() && i < VIDEO_MAX_PLANES; ++i) {
            mp.plane_fmt[i].bytesperline = bytesperline[i];
        }
    } else {
        v4l2_pix_format& pix = format.fmt.pix;
        pix.width = width;
        pix.height = height;
        pix.pixelformat = fourcc_code(fourcc);
        pix.field = V4L2_FIELD_NONE;
        pix.bytesperline = bytesperline.empty() ? 0 : bytesperline[0];
    }
    ioctl_or_throw(VIDIOC_S_FMT, &format, "VIDIOC_S_FMT");
    Format result;
    if (multi_planar()) {
        const v4l2_pix_format_mplane& mp = format.fmt.pix_mp;
        result.fourcc = fourcc_string(mp.pixelformat);
        result.width = mp.width;
        result.height = mp.height;
        for (std::size_t i = 0; i < mp.num_planes && i < VIDEO_MAX_PLANES; ++i) {
            result.planes.push_back({mp.plane_fmt[i].bytesperline, mp.plane_fmt[i].sizeimage});
        }
    } else {
        const v4l2_pix_format& pix = format.fmt.pix;
        result.fourcc = fourcc_string(pix.pixelformat);
        result.width = pix.width;
        result.height = pix.height;
        result.planes.push_back({pix.bytesperline, pix.sizeimage});
    }
    return result;
}

std::optional<v4l2_queryctrl> Device::find_control(const std::string& name) {
    v4l2_queryctrl control{};
    control.id = V4L2_CTRL_FLAG_NEXT_CTRL;
    while (::ioctl(fd_.get(), VIDIOC_QUERYCTRL, &control) == 0) {
        if (name == reinterpret_cast<const char*>(control.name)) {
            return control;
        }
        control.id |= V4L2_CTRL_FLAG_NEXT_CTRL;
    }
    return std::nullopt;
}

std::optional<std::int32_t> Device::menu_index(const v4l2_queryctrl& control, const std::string& entry) {
    for (std::int32_t index = control.minimum; index <= control.maximum; ++index) {
        v4l2_querymenu item{};
        item.id = control.id;
        item.index = static_cast<std::uint32_t>(index);
        if (::ioctl(fd_.get(), VIDIOC_QUERYMENU, &item) == 0 && entry == reinterpret_cast<const char*>(item.name)) {
            return index;
        }
    }
    return std::nullopt;
}

std::vector<std::string> Device::make_deterministic(const std::string& pattern) {
    const std::pair<const char*, std::string> wanted[] = {
        {"Test Pattern", pattern},
        {"OSD Text Mode", "None"},
        {"Horizontal Movement", "No Movement"},
        {"Vertical Movement", "No Movement"},
    };
    std::vector<std::string> set;
    for (const auto& [name, entry] : wanted) {
        const std::optional<v4l2_queryctrl> control = find_control(name);
        if (!control) {
            continue;  // not vivid, or an older one
        }
        const std::optional<std::int32_t> index = menu_index(*control, entry);
        if (!index) {
            throw std::invalid_argument(std::string(name) + " has no entry \"" + entry + "\"");
        }
        v4l2_control value{};
        value.id = control->id;
        value.value = *index;
        ioctl_or_throw(VIDIOC_S_CTRL, &value, "VIDIOC_S_CTRL");
        set.push_back(std::string(name) + "=" + entry);
    }
    return set;
}

std::uint32_t Device::request_buffers(std::uint32_t memory, std::uint32_t count) {
    v4l2_requestbuffers request{};
    request.count = count;
    request.type = type_;
    request.memory = memory;
    ioctl_or_throw(VIDIOC_REQBUFS, &request, "VIDIOC_REQBUFS");
    return request.count;
}

std::vector<std::pair<std::uint32_t, std::uint32_t>> Device::query_mmap(std::uint32_t index, std::size_t planes) {
    v4l2_buffer buffer{};
    v4l2_plane plane_array[VIDEO_MAX_PLANES] = {};
    buffer.index = index;
    buffer.type = type_;
    buffer.memory = V4L2_MEMORY_MMAP;
    if (multi_planar()) {
        buffer.m.planes = plane_array;
        buffer.length = static_cast<std::uint32_t>(planes);
    }
    ioctl_or_throw(VIDIOC_QUERYBUF, &buffer, "VIDIOC_QUERYBUF");
    std::vector<std::pair<std::uint32_t, std::uint32_t>> result;
    if (multi_planar()) {
        for (std::uint32_t i = 0; i < buffer.length; ++i) {
            result.emplace_back(plane_array[i].m.mem_offset, plane_array[i].length);
        }
    } else {
        result.emplace_back(buffer.m.offset, buffer.length);
    }
    return result;
}

void Device::queue_mmap(std::uint32_t index, std::size_t planes) {
    v4l2_buffer buffer{};
    v4l2_plane plane_array[VIDEO_MAX_PLANES] = {};
    buffer.index = index;
    buffer.type = type_;
    buffer.memory = V4L2_MEMORY_MMAP;
    if (multi_planar()) {
        buffer.m.planes = plane_array;
        buffer.length = static_cast<std::uint32_t>(planes);
    }
    ioctl_or_throw(VIDIOC_QBUF, &buffer, "VIDIOC_QBUF (MMAP)");
}

void Device::queue_dmabuf(std::uint32_t index, const std::vector<int>& fds, const std::vector<std::uint32_t>& lengths) {
    v4l2_buffer buffer{};
    v4l2_plane plane_array[VIDEO_MAX_PLANES] = {};
    buffer.index = index;
    buffer.type = type_;
    buffer.memory = V4L2_MEMORY_DMABUF;
    if (multi_planar()) {
        for (std::size_t i = 0; i < fds.size() && i < VIDEO_MAX_PLANES; ++i) {
            plane_array[i].m.fd = fds[i];
            plane_array[i].length = lengths[i];
        }
        buffer.m.planes = plane_array;
        buffer.length = static_cast<std::uint32_t>(fds.size());
    } else {
        buffer.m.fd = fds.at(0);
        buffer.length = lengths.at(0);
    }
    ioctl_or_throw(VIDIOC_QBUF, &buffer, "VIDIOC_QBUF (DMABUF)");
}

Dequeued Device::dequeue(std::uint32_t memory, std::size_t planes, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
        v4l2_buffer buffer{};
        v4l2_plane plane_array[VIDEO_MAX_PLANES] = {};
        buffer.type = type_;
        buffer.memory = memory;
        if (multi_planar()) {
            buffer.m.planes = plane_array;
            buffer.length = static_cast<std::uint32_t>(planes);
        }
        if (::ioctl(fd_.get(), VIDIOC_DQBUF, &buffer) == 0) {
            Dequeued frame;
            frame.index = buffer.index;
            frame.sequence = buffer.sequence;
            frame.error = (buffer.flags & V4L2_BUF_FLAG_ERROR) != 0;
            if (multi_planar()) {
                for (std::uint32_t i = 0; i < buffer.length; ++i) {
                    frame.bytesused.push_back(plane_array[i].bytesused);
                }
            } else {
                frame.bytesused.push_back(buffer.bytesused);
            }
            return frame;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN) {
            throw Error("VIDIOC_DQBUF on " + path_, errno);
        }
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            throw Error("no frame from " + path_ + " in " + std::to_string(timeout.count()) + " ms", ETIMEDOUT);
        }
        pollfd entry{fd_.get(), POLLIN, 0};
        ::poll(&entry, 1, static_cast<int>(left.count()));
    }
}

void Device::stream(bool on) {
    int type = static_cast<int>(type_);
    ioctl_or_throw(on ? VIDIOC_STREAMON : VIDIOC_STREAMOFF, &type, on ? "VIDIOC_STREAMON" : "VIDIOC_STREAMOFF");
}

}  // namespace v4l2
