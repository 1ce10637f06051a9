#include "dmabufd/pool.hpp"

#include <string>
#include <utility>

#include "dmabufd/errors.hpp"

namespace dmabufd {

Pool::Pool(std::uint64_t id, ImageFormat format, std::vector<PlaneLayout> planes, std::vector<Buffer> buffers,
           std::vector<std::vector<std::size_t>> frames, std::uint64_t frame_bytes, bool recycled, Booking booking)
    : id_(id),
      format_(std::move(format)),
      planes_(std::move(planes)),
      booking_(std::move(booking)),
      buffers_(std::move(buffers)),
      frames_(std::move(frames)),
      frame_bytes_(frame_bytes),
      recycled_(recycled) {}

Pool& Pool::operator=(Pool&& other) noexcept {
    if (this != &other) {
        buffers_.clear();
        id_ = other.id_;
        format_ = std::move(other.format_);
        planes_ = std::move(other.planes_);
        booking_ = std::move(other.booking_);
        buffers_ = std::move(other.buffers_);
        frames_ = std::move(other.frames_);
        frame_bytes_ = other.frame_bytes_;
        recycled_ = other.recycled_;
    }
    return *this;
}

Pool::~Pool() {
    // Members go in reverse order anyway; spelled out because the order
    // matters: a recycled pool must not be handed on while we hold it.
    buffers_.clear();
}

Buffer& Pool::frame_buffer(std::size_t frame, std::size_t index) {
    if (frame >= frames_.size() || index >= frames_[frame].size()) {
        throw OutOfRange(StatusCode::OutOfRange,
                         "pool " + std::to_string(id_) + " has no buffer " + std::to_string(index) + " in frame " +
                             std::to_string(frame));
    }
    return buffers_[frames_[frame][index]];
}

const Buffer& Pool::frame_buffer(std::size_t frame, std::size_t index) const {
    return const_cast<Pool*>(this)->frame_buffer(frame, index);
}

void Pool::release() {
    buffers_.clear();
    frames_.clear();
    booking_.release();
}

}  // namespace dmabufd
