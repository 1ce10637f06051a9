#include "dmabufd/mapping.hpp"

#include <linux/dma-buf.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <cerrno>
#include <utility>

#include "dmabufd/errors.hpp"

namespace dmabufd {

namespace {

bool reads(Access access) { return (static_cast<int>(access) & static_cast<int>(Access::Read)) != 0; }
bool writes(Access access) { return (static_cast<int>(access) & static_cast<int>(Access::Write)) != 0; }

}  // namespace

int sync_dma_buf(int fd, Access access, bool end) noexcept {
    struct dma_buf_sync request {};
    request.flags = end ? DMA_BUF_SYNC_END : DMA_BUF_SYNC_START;
    if (reads(access)) {
        request.flags |= DMA_BUF_SYNC_READ;
    }
    if (writes(access)) {
        request.flags |= DMA_BUF_SYNC_WRITE;
    }
    // The kernel waits for the buffer's fences here; a signal or a
    // contended reservation makes it return EINTR or EAGAIN: try again.
    while (::ioctl(fd, DMA_BUF_IOCTL_SYNC, &request) < 0) {
        if (errno != EINTR && errno != EAGAIN) {
            return errno;
        }
    }
    return 0;
}

Mapping::Mapping(int fd, std::size_t size, Access access, CpuSync sync) : fd_(fd), size_(size), access_(access) {
    if (size == 0) {
        throw InvalidArgument(StatusCode::InvalidArgument, "cannot map 0 bytes");
    }
    const int protection = (reads(access) ? PROT_READ : 0) | (writes(access) ? PROT_WRITE : 0);
    void* address = ::mmap(nullptr, size, protection, MAP_SHARED, fd, 0);
    if (address == MAP_FAILED) {
        throw SystemError("mmap of a buffer of " + std::to_string(size) + " bytes", errno);
    }
    if (sync == CpuSync::None) {
        address_ = address;
        return;
    }
    const int error = sync_dma_buf(fd, access, /*end=*/false);
    if (error == ENOTTY && sync == CpuSync::Probe) {
        // Not a dma-buf (a memfd): there is nothing to sync.
        address_ = address;
        return;
    }
    if (error != 0) {
        ::munmap(address, size);
        throw SystemError("DMA_BUF_IOCTL_SYNC start", error);
    }
    address_ = address;
    synced_ = true;
}

Mapping::Mapping(Mapping&& other) noexcept
    : fd_(other.fd_),
      address_(std::exchange(other.address_, nullptr)),
      size_(other.size_),
      access_(other.access_),
      synced_(std::exchange(other.synced_, false)) {}

Mapping& Mapping::operator=(Mapping&& other) noexcept {
    if (this != &other) {
        end_quietly();
        fd_ = other.fd_;
        address_ = std::exchange(other.address_, nullptr);
        size_ = other.size_;
        access_ = other.access_;
        synced_ = std::exchange(other.synced_, false);
    }
    return *this;
}

Mapping::~Mapping() { end_quietly(); }

void Mapping::end() {
    int error = 0;
    if (synced_) {
        error = sync_dma_buf(fd_, access_, /*end=*/true);
        synced_ = false;
    }
    if (address_ != nullptr) {
        ::munmap(address_, size_);
        address_ = nullptr;
    }
    if (error != 0) {
        throw SystemError("DMA_BUF_IOCTL_SYNC end", error);
    }
}

void Mapping::end_quietly() noexcept {
    try {
        end();
    } catch (const Error&) {
        // A destructor cannot report it; the mapping is gone either way.
    }
}

}  // namespace dmabufd
