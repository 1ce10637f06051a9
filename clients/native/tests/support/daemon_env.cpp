#include "daemon_env.hpp"

#include <dirent.h>

#include <algorithm>
#include <cstdlib>
#include <sstream>

#include "harness.hpp"

namespace dmabufd_test {

std::string runtime_dir() {
    const char* directory = std::getenv("DMABUFD_RUNTIME_DIR");
    if (directory == nullptr || *directory == '\0') {
        fail("DMABUFD_RUNTIME_DIR is not set: these tests need a running dmabufd (see clients/native/README.md)",
             __FILE__, __LINE__);
    }
    return directory;
}

dmabufd::Client connect(dmabufd::ReaderMode mode) {
    dmabufd::ConnectOptions options;
    options.runtime_dir = runtime_dir();
    options.reader = mode;
    // Generous: the same binaries run in an emulated (TCG) VM.
    options.timeout = std::chrono::seconds(60);
    return dmabufd::Client::connect(options);
}

std::vector<dmabufd::HeapInfo> heaps_under_test(dmabufd::Client& client) {
    static const std::vector<std::string> kInteresting = {"system", "udmabuf", "memfd"};
    std::vector<dmabufd::HeapInfo> chosen;
    for (const dmabufd::HeapInfo& heap : client.heaps()) {
        if (std::find(kInteresting.begin(), kInteresting.end(), heap.name) != kInteresting.end()) {
            chosen.push_back(heap);
        }
    }
    const char* expected = std::getenv("DMABUFD_NATIVE_EXPECT_HEAPS");
    std::stringstream names(expected != nullptr ? expected : "");
    std::string name;
    while (std::getline(names, name, ',')) {
        if (name.empty()) {
            continue;
        }
        const bool present = std::any_of(chosen.begin(), chosen.end(),
                                         [&](const dmabufd::HeapInfo& heap) { return heap.name == name; });
        CHECK_MSG(present, "DMABUFD_NATIVE_EXPECT_HEAPS names heap " + name + ", which the daemon does not have");
    }
    CHECK_MSG(!chosen.empty(), "the daemon has none of the heaps system, udmabuf, memfd");
    return chosen;
}

dmabufd::AllocateOptions on_heap(const std::string& heap, const std::string& name) {
    dmabufd::AllocateOptions options;
    options.heap = heap;
    options.name = name;
    return options;
}

int open_fd_count() {
    DIR* directory = ::opendir("/proc/self/fd");
    CHECK(directory != nullptr);
    int count = 0;
    while (const dirent* entry = ::readdir(directory)) {
        if (entry->d_name[0] != '.') {
            ++count;
        }
    }
    ::closedir(directory);
    return count - 1;  // the directory's own fd
}

}  // namespace dmabufd_test
