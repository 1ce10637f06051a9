#include "dmabufd/unique_fd.hpp"

#include <unistd.h>

namespace dmabufd {

void UniqueFd::reset(int fd) noexcept {
    const int old = std::exchange(fd_, fd);
    if (old >= 0) {
        // Never retried on EINTR: Linux has closed the fd whatever close()
        // returns, and a retry could close an fd another thread just got.
        ::close(old);
    }
}

}  // namespace dmabufd
