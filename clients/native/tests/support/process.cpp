#include "process.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "harness.hpp"

extern char** environ;

namespace dmabufd_test {

std::string executable_directory() {
    char path[PATH_MAX];
    const ssize_t length = ::readlink("/proc/self/exe", path, sizeof path - 1);
    CHECK(length > 0);
    std::string executable(path, static_cast<std::size_t>(length));
    return executable.substr(0, executable.rfind('/'));
}

PeerResult run_peer(const std::vector<std::string>& arguments, int inherited_fd) {
    const std::string peer = executable_directory() + "/dmabufd_test_peer";
    int output[2];
    CHECK(::pipe2(output, O_CLOEXEC) == 0);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, output[1], STDOUT_FILENO);
    if (inherited_fd >= 0) {
        // dup2 onto 3 clears close-on-exec there (fds arrive CLOEXEC).
        posix_spawn_file_actions_adddup2(&actions, inherited_fd, 3);
    }
    std::vector<char*> argv;
    argv.push_back(const_cast<char*>(peer.c_str()));
    for (const std::string& argument : arguments) {
        argv.push_back(const_cast<char*>(argument.c_str()));
    }
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int spawned = ::posix_spawn(&pid, peer.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(output[1]);
    if (spawned != 0) {
        ::close(output[0]);
        fail("posix_spawn " + peer + ": " + std::strerror(spawned), __FILE__, __LINE__);
    }
    PeerResult result;
    char chunk[4096];
    while (true) {
        const ssize_t got = ::read(output[0], chunk, sizeof chunk);
        if (got > 0) {
            result.output.append(chunk, static_cast<std::size_t>(got));
        } else if (got == 0 || errno != EINTR) {
            break;
        }
    }
    ::close(output[0]);
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return result;
}

}  // namespace dmabufd_test
