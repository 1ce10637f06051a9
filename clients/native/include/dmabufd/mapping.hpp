// Mapping: a buffer mapped for CPU access, bracketed by DMA_BUF_IOCTL_SYNC.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dmabufd {

enum class Access { Read = 1, Write = 2, ReadWrite = 3 };

// How CPU access to a mapping is bracketed.
enum class CpuSync {
    Required,  // a dma-buf: SYNC_START on mapping, SYNC_END on unmapping; failures throw
    None,      // a memfd: nothing to sync
    Probe,     // unknown (an fd from elsewhere): try SYNC_START; ENOTTY means not a dma-buf
};

// mmap(MAP_SHARED) of `size` bytes of `fd`, then DMA_BUF_IOCTL_SYNC START
// for `access` (retried on EINTR/EAGAIN); the destructor does SYNC END,
// then munmap. Move-only. The fd is borrowed: it must stay open while the
// Mapping lives (the mapping itself would keep the buffer alive, but the
// END ioctl needs the fd).
class Mapping {
public:
    Mapping(int fd, std::size_t size, Access access, CpuSync sync = CpuSync::Probe);
    Mapping(Mapping&& other) noexcept;
    Mapping& operator=(Mapping&& other) noexcept;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping();  // end(), errors swallowed

    std::uint8_t* data() noexcept { return static_cast<std::uint8_t*>(address_); }
    const std::uint8_t* data() const noexcept { return static_cast<const std::uint8_t*>(address_); }
    std::size_t size() const noexcept { return size_; }
    Access access() const noexcept { return access_; }
    // True while SYNC START is in effect (a dma-buf); false for a memfd.
    bool synced() const noexcept { return synced_; }
    bool mapped() const noexcept { return address_ != nullptr; }

    // SYNC END and munmap now; throws SystemError if the ioctl fails (the
    // mapping is gone either way).
    void end();

private:
    void end_quietly() noexcept;

    int fd_ = -1;
    void* address_ = nullptr;
    std::size_t size_ = 0;
    Access access_ = Access::Read;
    bool synced_ = false;
};

// DMA_BUF_IOCTL_SYNC with START or END for `access`, retried on EINTR and
// EAGAIN as the kernel documents. Returns 0, or the errno it failed with.
int sync_dma_buf(int fd, Access access, bool end) noexcept;

}  // namespace dmabufd
