// A second process: the test peer, started with posix_spawn (never fork:
// gRPC C++ is not fork-safe once a channel exists).
#pragma once

#include <string>
#include <vector>

namespace dmabufd_test {

struct PeerResult {
    int exit_code = -1;  // or 128 + signal
    std::string output;  // its stdout
};

// Runs dmabufd_test_peer (next to this executable) with `arguments`;
// `inherited_fd` >= 0 is passed to it as fd 3. Waits for it to exit.
PeerResult run_peer(const std::vector<std::string>& arguments, int inherited_fd = -1);

// Directory of the running executable (/proc/self/exe).
std::string executable_directory();

}  // namespace dmabufd_test
