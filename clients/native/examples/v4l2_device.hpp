// The V4L2 ioctls a capture into dmabufd buffers needs, on one open video
// node (from <linux/videodev2.h>; LP64 and 32-bit alike).
#pragma once

#include <linux/videodev2.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dmabufd/unique_fd.hpp"

namespace v4l2 {

struct PlaneFormat {
    std::uint32_t bytesperline = 0;
    std::uint32_t sizeimage = 0;
};

struct Format {
    std::string fourcc;
    std::uint32_t width = 0;
    std::uint32_t height = 0;
    std::vector<PlaneFormat> planes;  // one per memory plane
};

struct Dequeued {
    std::uint32_t index = 0;
    std::uint32_t sequence = 0;
    bool error = false;  // V4L2_BUF_FLAG_ERROR
    std::vector<std::uint32_t> bytesused;  // per memory plane
};

// A failed ioctl, with its name.
class Error : public std::runtime_error {
public:
    Error(const std::string& what, int error_number);
    int error_number() const noexcept { return errno_; }

private:
    int errno_;
};

std::string fourcc_string(std::uint32_t code);
std::uint32_t fourcc_code(const std::string& fourcc);

class Device {
public:
    explicit Device(const std::string& path);  // O_RDWR | O_NONBLOCK | O_CLOEXEC

    const std::string& path() const noexcept { return path_; }
    const std::string& driver() const noexcept { return driver_; }
    bool multi_planar() const noexcept { return type_ == V4L2_BUF_TYPE_VIDEO_CAPTURE_MPLANE; }
    std::uint32_t buffer_type() const noexcept { return type_; }
    int fd() const noexcept { return fd_.get(); }

    std::vector<std::string> formats();
    // VIDIOC_S_FMT with one bytesperline per memory plane; the driver's answer.
    Format set_format(const std::string& fourcc, std::uint32_t width, std::uint32_t height,
                      const std::vector<std::uint32_t>& bytesperline);

    // For vivid: a fixed test pattern, no OSD text, no movement, so every
    // frame is the same. Returns the controls it set.
    std::vector<std::string> make_deterministic(const std::string& pattern = "100% Color Squares");

    std::uint32_t request_buffers(std::uint32_t memory, std::uint32_t count);
    // VIDIOC_QUERYBUF of an MMAP buffer: (offset, length) per plane.
    std::vector<std::pair<std::uint32_t, std::uint32_t>> query_mmap(std::uint32_t index, std::size_t planes);
    void queue_mmap(std::uint32_t index, std::size_t planes);
    // One dma-buf per memory plane; `lengths` are the dma-bufs' sizes.
    void queue_dmabuf(std::uint32_t index, const std::vector<int>& fds, const std::vector<std::uint32_t>& lengths);
    // Waits up to `timeout` for a filled buffer.
    Dequeued dequeue(std::uint32_t memory, std::size_t planes, std::chrono::milliseconds timeout);
    void stream(bool on);

private:
    void ioctl_or_throw(unsigned long request, void* argument, const char* name);
    std::optional<v4l2_queryctrl> find_control(const std::string& name);
    std::optional<std::int32_t> menu_index(const v4l2_queryctrl& control, const std::string& entry);

    std::string path_;
    dmabufd::UniqueFd fd_;
    std::string driver_;
    std::uint32_t type_ = V4L2_BUF_TYPE_VIDEO_CAPTURE;
};

}  // namespace v4l2
