// Where the daemon listens (fd-protocol.md 1.1).
#pragma once

#include <string>

namespace dmabufd {

// $DMABUFD_RUNTIME_DIR if set and not empty; else /dev/socket where init made
// dmabufd's sockets (an Android device); else /run/dmabufd for euid 0 or when
// a system daemon listens there; else $XDG_RUNTIME_DIR/dmabufd; else
// /tmp/dmabufd-<euid>/dmabufd.
std::string default_runtime_dir();

// The daemon's two sockets in `runtime_dir`: init's names in /dev/socket,
// the runtime directory's names everywhere else.
struct SocketPaths {
    std::string control;  // SOCK_STREAM, gRPC
    std::string fd;       // SOCK_SEQPACKET, the fd protocol
};
SocketPaths socket_paths(const std::string& runtime_dir);

}  // namespace dmabufd
