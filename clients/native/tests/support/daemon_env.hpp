// The real daemon every test talks to, as the environment names it.
#pragma once

#include <string>
#include <vector>

#include "dmabufd/client.hpp"

namespace dmabufd_test {

// $DMABUFD_RUNTIME_DIR; a test fails (never skips) when it is unset.
std::string runtime_dir();

dmabufd::Client connect(dmabufd::ReaderMode mode = dmabufd::ReaderMode::OwnThread);

// The heaps to exercise, of system, udmabuf and memfd: those the daemon
// has. Every heap named in $DMABUFD_NATIVE_EXPECT_HEAPS (comma-separated;
// the VM run names system,udmabuf) must be among them, or the test fails.
std::vector<dmabufd::HeapInfo> heaps_under_test(dmabufd::Client& client);

dmabufd::AllocateOptions on_heap(const std::string& heap, const std::string& name = "conformance");

// Open fds of this process (/proc/self/fd).
int open_fd_count();

}  // namespace dmabufd_test
