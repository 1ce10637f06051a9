#include "dmabufd/runtime_dir.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "dmabufd/fd_protocol.h"

namespace dmabufd {

namespace {

bool exists(const std::string& path) {
    struct stat status {};
    return ::stat(path.c_str(), &status) == 0;
}

}  // namespace

SocketPaths socket_paths(const std::string& runtime_dir) {
    if (runtime_dir == DBFD_ANDROID_SOCKET_DIR) {
        return {runtime_dir + "/" + DBFD_ANDROID_CONTROL_SOCKET_NAME, runtime_dir + "/" + DBFD_ANDROID_FD_SOCKET_NAME};
    }
    return {runtime_dir + "/" + DBFD_CONTROL_SOCKET_NAME, runtime_dir + "/" + DBFD_FD_SOCKET_NAME};
}

std::string default_runtime_dir() {
    const char* configured = std::getenv(DBFD_RUNTIME_DIR_ENV);
    if (configured != nullptr && *configured != '\0') {
        return configured;
    }
    if (exists(std::string(DBFD_ANDROID_SOCKET_DIR) + "/" + DBFD_ANDROID_CONTROL_SOCKET_NAME)) {
        return DBFD_ANDROID_SOCKET_DIR;
    }
    const std::string system_dir = DBFD_SYSTEM_RUNTIME_DIR;
    const bool system_daemon = exists(system_dir + "/" + DBFD_CONTROL_SOCKET_NAME);
    if (::geteuid() == 0 || system_daemon) {
        return system_dir;
    }
    const char* xdg = std::getenv("XDG_RUNTIME_DIR");
    if (xdg != nullptr && *xdg != '\0') {
        return std::string(xdg) + "/dmabufd";
    }
    return "/tmp/dmabufd-" + std::to_string(::geteuid()) + "/dmabufd";
}

}  // namespace dmabufd
