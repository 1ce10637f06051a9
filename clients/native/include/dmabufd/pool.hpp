// Pool: an image pool, count frames of one format, released together.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dmabufd/booking.hpp"
#include "dmabufd/buffer.hpp"

namespace dmabufd {

struct ImageFormat {
    std::string fourcc;  // V4L2/DRM: "YUYV", "NV12", "NM12", ...
    std::uint32_t width = 0;
    std::uint32_t height = 0;
    std::uint32_t stride_align = 0;  // 0 or 1: none
};

// Where one plane of every frame lives.
struct PlaneLayout {
    std::uint32_t buffer_index = 0;  // which of the frame's buffers
    std::uint64_t offset = 0;
    std::uint32_t stride = 0;
    std::uint64_t size = 0;
};

struct PoolRequest {
    ImageFormat format;
    std::uint32_t count = 0;
    bool buffer_per_plane = false;  // multi-planar formats get it anyway
    std::string heap;
    std::string usage = "camera";
    std::string name;
    bool recycle = false;  // keep the buffers warm for the next pool of this format
};

// Move-only. Owns every fd of the pool; destroying it closes them all,
// then releases the pool (ReleasePool) if this session allocated it.
class Pool {
public:
    Pool(std::uint64_t id, ImageFormat format, std::vector<PlaneLayout> planes,
         std::vector<Buffer> buffers, std::vector<std::vector<std::size_t>> frames,
         std::uint64_t frame_bytes, bool recycled, Booking booking);
    Pool(Pool&&) noexcept = default;
    // Closes the fds held before releasing the pool held, as destruction does.
    Pool& operator=(Pool&& other) noexcept;
    Pool(const Pool&) = delete;
    Pool& operator=(const Pool&) = delete;
    ~Pool();

    std::uint64_t id() const noexcept { return id_; }
    const ImageFormat& format() const noexcept { return format_; }
    const std::vector<PlaneLayout>& planes() const noexcept { return planes_; }
    std::size_t frame_count() const noexcept { return frames_.size(); }
    // Buffers of one frame: one, or one per plane.
    std::size_t buffers_per_frame() const noexcept { return frames_.empty() ? 0 : frames_[0].size(); }
    Buffer& frame_buffer(std::size_t frame, std::size_t index = 0);
    const Buffer& frame_buffer(std::size_t frame, std::size_t index = 0) const;
    // Every buffer, in the daemon's order.
    std::vector<Buffer>& buffers() noexcept { return buffers_; }
    const std::vector<Buffer>& buffers() const noexcept { return buffers_; }
    std::uint64_t frame_bytes() const noexcept { return frame_bytes_; }
    bool recycled() const noexcept { return recycled_; }
    bool booked() const noexcept { return booking_.held(); }

    // Closes every fd, then ReleasePool now (throws its error).
    void release();

private:
    std::uint64_t id_;
    ImageFormat format_;
    std::vector<PlaneLayout> planes_;
    Booking booking_;  // declared before the buffers, so released after they are closed
    std::vector<Buffer> buffers_;
    std::vector<std::vector<std::size_t>> frames_;  // indexes into buffers_
    std::uint64_t frame_bytes_;
    bool recycled_;
};

}  // namespace dmabufd
