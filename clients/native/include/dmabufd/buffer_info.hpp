// What the daemon says about heaps and buffers (plain values, no ownership).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dmabufd {

// Values match dmabufd.v1.Backend.
enum class Backend : int { Unspecified = 0, DmaHeap = 1, Udmabuf = 2, Memfd = 3 };

// DMA-heap and udmabuf buffers are dma-bufs (devices import them, CPU
// access needs DMA_BUF_IOCTL_SYNC); memfd buffers are shared memory only.
inline bool is_dma_buf(Backend backend) {
    return backend == Backend::DmaHeap || backend == Backend::Udmabuf;
}

struct BufferInfo {
    std::uint64_t id = 0;  // daemon-wide unique; the key of the fd in a delivery
    std::uint64_t size = 0;
    std::string heap;
    Backend backend = Backend::Unspecified;
    std::string kernel_name;  // "<pid>:<label>", as fdinfo or the memfd link shows it
    std::string usage;
    double created_at = 0;
    std::uint64_t inode = 0;  // == fstat(fd).st_ino
};

struct HeapInfo {
    std::string name;
    std::string device_path;  // empty for memfd
    Backend backend = Backend::Unspecified;
    bool device_importable = false;
    std::uint64_t max_buffer_bytes = 0;
    bool zeroed = false;
    bool cpu_sync_required = false;
    std::uint64_t granule_bytes = 0;
    std::vector<std::string> aliases;
    bool allowed = false;  // this client may allocate from it
};

struct AllocateOptions {
    std::string heap;   // a heap name or alias; empty: by usage
    std::string usage;  // a usage hint; empty: "default"
    std::string name;   // label, at most 23 printable ASCII bytes
};

// The calling session's accounting (GetStats), quotas being per uid.
struct SessionStats {
    std::uint64_t session_id = 0;
    std::uint32_t buffer_count = 0;
    std::uint64_t bytes = 0;
    std::uint64_t quota_bytes = 0;
    std::uint32_t quota_buffers = 0;
    std::uint64_t charged_bytes = 0;  // over all the uid's sessions
    std::uint32_t charged_buffers = 0;
};

}  // namespace dmabufd
