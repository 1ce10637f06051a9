// Allocate a buffer, map it, write it, and let a second process check
// the bytes: by a grant it redeems with a session of its own (--via
// grant, the default), or by inheriting the fd (--via fd).
//
//   dmabufd_share_buffer [--runtime-dir DIR] [--heap NAME] [--size BYTES] [--via grant|fd]
//
// The second process is this program again, started with posix_spawn:
// gRPC C++ is not fork-safe, so a process with a channel never forks
// without exec'ing at once. Exit 0 when the second process saw every byte.
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "dmabufd/dmabufd.hpp"

extern char** environ;

namespace {

std::uint8_t expected_byte(std::size_t offset) {
    return static_cast<std::uint8_t>(offset * 31 + 7 + (offset >> 12));
}

struct Options {
    std::string runtime_dir;
    std::string heap;
    std::size_t size = 4 << 20;
    std::string via = "grant";
    std::string receive_token;  // second process, --via grant
    bool receive_fd = false;    // second process, --via fd: the buffer is fd 3
};

Options parse(int argc, char** argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
        if (flag == "--receive-fd") {
            options.receive_fd = true;
            continue;
        }
        if (value == nullptr) {
            throw std::invalid_argument("missing value after " + flag);
        }
        ++i;
        if (flag == "--runtime-dir") {
            options.runtime_dir = value;
        } else if (flag == "--heap") {
            options.heap = value;
        } else if (flag == "--size") {
            options.size = std::strtoull(value, nullptr, 0);
        } else if (flag == "--via") {
            options.via = value;
        } else if (flag == "--receive-token") {
            options.receive_token = value;
        } else {
            throw std::invalid_argument("unknown option " + flag);
        }
    }
    if (options.size == 0 || (options.via != "grant" && options.via != "fd")) {
        throw std::invalid_argument("--size must be > 0, --via grant or fd");
    }
    return options;
}

dmabufd::Client connect(const Options& options) {
    dmabufd::ConnectOptions connect_options;
    connect_options.runtime_dir = options.runtime_dir;
    connect_options.timeout = std::chrono::seconds(60);
    return dmabufd::Client::connect(connect_options);
}

// 0 when `mapping` holds the expected bytes.
int verify(const dmabufd::Mapping& mapping, const std::string& what) {
    for (std::size_t i = 0; i < mapping.size(); ++i) {
        if (mapping.data()[i] != expected_byte(i)) {
            std::printf("receiver: %s differs at byte %zu\n", what.c_str(), i);
            return 1;
        }
    }
    std::printf("receiver (pid %d): %s: all %zu bytes as written (sync %s)\n", ::getpid(), what.c_str(),
                mapping.size(), mapping.synced() ? "START/END" : "not needed: memfd");
    return 0;
}

int receive(const Options& options) {
    if (options.receive_fd) {
        // Nothing known but the fd: probe whether it is a dma-buf.
        const dmabufd::Mapping mapping(3, options.size, dmabufd::Access::Read, dmabufd::CpuSync::Probe);
        return verify(mapping, "the inherited fd");
    }
    dmabufd::Client client = connect(options);
    const dmabufd::Redeemed redeemed = client.redeem(options.receive_token);
    if (redeemed.buffers.size() != 1) {
        std::printf("receiver: the grant held %zu buffers, not 1\n", redeemed.buffers.size());
        return 1;
    }
    const dmabufd::Buffer& buffer = redeemed.buffers.front();
    const dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Read);
    return verify(mapping, "buffer " + std::to_string(buffer.id()) + " redeemed from grant " +
                               std::to_string(redeemed.grant_id));
}

// Runs this program again with `arguments`, `inherited_fd` as its fd 3.
int run_receiver(const std::vector<std::string>& arguments, int inherited_fd) {
    std::vector<char*> argv;
    static char self[] = "/proc/self/exe";
    argv.push_back(self);
    for (const std::string& argument : arguments) {
        argv.push_back(const_cast<char*>(argument.c_str()));
    }
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    if (inherited_fd >= 0) {
        // dup2 clears close-on-exec on the copy (received fds are CLOEXEC).
        posix_spawn_file_actions_adddup2(&actions, inherited_fd, 3);
    }
    pid_t pid = -1;
    const int error = ::posix_spawn(&pid, self, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (error != 0) {
        std::fprintf(stderr, "posix_spawn: %s\n", std::strerror(error));
        return 1;
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

int share(const Options& options) {
    dmabufd::Client client = connect(options);
    dmabufd::AllocateOptions allocate;
    allocate.heap = options.heap;
    allocate.name = "shared";
    dmabufd::Buffer buffer = client.allocate(options.size, allocate);
    {
        dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Write);
        for (std::size_t i = 0; i < options.size; ++i) {
            mapping.data()[i] = expected_byte(i);
        }
    }  // SYNC_END: the CPU's writes are visible to every other user of the buffer
    std::printf("sender (pid %d): buffer %llu, %llu bytes in heap %s (%s), written\n", ::getpid(),
                static_cast<unsigned long long>(buffer.id()), static_cast<unsigned long long>(buffer.size()),
                buffer.info().heap.c_str(), buffer.info().kernel_name.c_str());
    std::fflush(stdout);  // before the receiver writes to the same stdout
    std::vector<std::string> arguments = {"--size", std::to_string(options.size)};
    if (!options.runtime_dir.empty()) {
        arguments.insert(arguments.end(), {"--runtime-dir", options.runtime_dir});
    }
    int code;
    if (options.via == "fd") {
        arguments.push_back("--receive-fd");
        code = run_receiver(arguments, buffer.fd());
    } else {
        const dmabufd::GrantHandle grant = client.grant({buffer.id()}, dmabufd::GrantTo::token());
        std::printf("sender: grant %llu, token %.8s...\n", static_cast<unsigned long long>(grant.id),
                    grant.token.c_str());
        arguments.insert(arguments.end(), {"--receive-token", grant.token});
        code = run_receiver(arguments, -1);
    }
    std::printf("%s\n", code == 0 ? "shared: OK" : "shared: FAILED");
    return code;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const Options options = parse(argc, argv);
        if (options.receive_fd || !options.receive_token.empty()) {
            return receive(options);
        }
        return share(options);
    } catch (const dmabufd::Error& error) {
        std::fprintf(stderr, "dmabufd: %s (%s%s%s)\n", error.what(), dmabufd::status_name(error.status()),
                     error.reason().empty() ? "" : ", ", error.reason().c_str());
        return 1;
    } catch (const std::invalid_argument& error) {
        std::fprintf(stderr, "%s\nusage: %s [--runtime-dir DIR] [--heap NAME] [--size BYTES] [--via grant|fd]\n",
                     error.what(), argv[0]);
        return 2;
    }
}
