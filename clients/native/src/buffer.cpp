#include "dmabufd/buffer.hpp"

#include <utility>

#include "dmabufd/errors.hpp"

namespace dmabufd {

Buffer::Buffer(UniqueFd fd, BufferInfo info, Booking booking, bool read_only)
    : info_(std::move(info)), read_only_(read_only), booking_(std::move(booking)), fd_(std::move(fd)) {}

Buffer& Buffer::operator=(Buffer&& other) noexcept {
    if (this != &other) {
        fd_.reset();
        booking_ = std::move(other.booking_);
        fd_ = std::move(other.fd_);
        info_ = std::move(other.info_);
        read_only_ = other.read_only_;
    }
    return *this;
}

Mapping Buffer::map(Access access) const {
    if (!fd_) {
        throw InvalidArgument(StatusCode::InvalidArgument, "buffer " + std::to_string(id()) + " has no fd");
    }
    if (read_only_ && access != Access::Read) {
        throw InvalidArgument(StatusCode::InvalidArgument,
                              "buffer " + std::to_string(id()) + " is read-only: map it for Access::Read");
    }
    // memfd buffers have no sync ioctl (it fails ENOTTY): skip it, as the
    // Python client does, rather than probe on every map.
    return Mapping(fd_.get(), static_cast<std::size_t>(size()), access,
                   is_dma_buf() ? CpuSync::Required : CpuSync::None);
}

void Buffer::release() {
    fd_.reset();
    booking_.release();
}

}  // namespace dmabufd
