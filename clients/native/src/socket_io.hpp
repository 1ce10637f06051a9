// The fd socket's system calls: connect, one message in, one frame out.
// Nothing here locks; the session decides who may call what.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "dmabufd/fd_protocol.h"
#include "dmabufd/session.hpp"
#include "dmabufd/unique_fd.hpp"

namespace dmabufd::detail {

struct ReceivedMessage {
    std::array<std::uint8_t, DBFD_RECEIVE_BUFFER_BYTES> data{};
    std::size_t length = 0;
    std::vector<UniqueFd> fds;  // owned from the moment recvmsg returned
    int flags = 0;              // msg_flags: MSG_CTRUNC, MSG_TRUNC
};

enum class Received {
    Message,     // `out` holds one message
    WouldBlock,  // nothing queued
    EndOfFile,   // the daemon closed its end: the session is over
    Reset,       // ECONNRESET: the session is over, but frames may still be queued
};

// A SOCK_SEQPACKET socket connected to `path` (close-on-exec). Throws
// Unavailable when nobody listens there.
UniqueFd connect_fd_socket(const std::string& path);

// One recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC), retried on EINTR, with a
// control buffer for 253 fds. Throws SystemError for other failures.
Received receive_message(int socket, ReceivedMessage& out);

// One frame, with MSG_NOSIGNAL (a closed session gives EPIPE, not
// SIGPIPE) and, if `attached_fd` >= 0, that fd in SCM_RIGHTS. Retried on
// EINTR. Returns 0 or the errno.
int send_frame(int socket, const void* frame, std::size_t length, int attached_fd = -1) noexcept;

// poll() for POLLIN on `socket` and, if >= 0, `wakeup` (an eventfd), until
// `deadline`; EINTR restarts it. Returns whether the socket is readable
// (or hung up), whether the wakeup fired.
struct PollResult {
    bool socket_ready = false;
    bool woken = false;
};
PollResult poll_readable(int socket, int wakeup, Clock::time_point deadline);

// A non-blocking, close-on-exec eventfd, and its two operations.
UniqueFd make_eventfd();
void signal_eventfd(int event) noexcept;
void drain_eventfd(int event) noexcept;

}  // namespace dmabufd::detail
