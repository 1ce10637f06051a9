// Buffer: one buffer's fd, what the daemon says about it, and its booking.
#pragma once

#include <cstdint>
#include <utility>

#include "dmabufd/booking.hpp"
#include "dmabufd/buffer_info.hpp"
#include "dmabufd/mapping.hpp"
#include "dmabufd/unique_fd.hpp"

namespace dmabufd {

// Move-only. Destroying a Buffer closes its fd first, then releases its
// booking (if it has one: a pool's buffers and redeemed buffers are
// booked elsewhere), so the daemon never recycles memory this process
// still holds. Copies of the fd handed to other processes stay valid.
class Buffer {
public:
    Buffer(UniqueFd fd, BufferInfo info, Booking booking, bool read_only);
    Buffer(Buffer&&) noexcept = default;
    // Closes the fd held before releasing the booking held, as destruction does.
    Buffer& operator=(Buffer&& other) noexcept;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() = default;

    const BufferInfo& info() const noexcept { return info_; }
    std::uint64_t id() const noexcept { return info_.id; }
    std::uint64_t size() const noexcept { return info_.size; }
    bool is_dma_buf() const noexcept { return dmabufd::is_dma_buf(info_.backend); }
    // O_RDONLY (a read-only grant, a sealed model): map for Access::Read only.
    bool read_only() const noexcept { return read_only_; }
    bool booked() const noexcept { return booking_.held(); }

    // Borrowed: queue it to V4L2, pass it with SCM_RIGHTS... -1 once taken.
    int fd() const noexcept { return fd_.get(); }
    // The fd leaves the Buffer, which forgets its booking: the buffer stays
    // booked to the session until Client::release of its id or the
    // session's end.
    UniqueFd detach() noexcept {
        booking_.abandon();
        return std::move(fd_);
    }

    // Maps the whole buffer; dma-bufs get DMA_BUF_IOCTL_SYNC brackets,
    // memfds none. Throws InvalidArgument for Write on a read-only buffer.
    Mapping map(Access access = Access::ReadWrite) const;

    // Closes the fd, then releases the booking now (throws its error).
    void release();

private:
    BufferInfo info_;
    bool read_only_ = false;
    Booking booking_;
    UniqueFd fd_;  // declared last, so destroyed (closed) before the booking is released
};

}  // namespace dmabufd
