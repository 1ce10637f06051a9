#include "socket_io.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "dmabufd/errors.hpp"

namespace dmabufd::detail {

namespace {

constexpr std::size_t kFdBytes = DBFD_MAX_FDS_PER_FRAME * sizeof(int);

// Aligned for struct cmsghdr, sized for the most fds one frame carries.
union ControlBuffer {
    char bytes[CMSG_SPACE(kFdBytes)];
    struct cmsghdr align;
};

}  // namespace

UniqueFd connect_fd_socket(const std::string& path) {
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    if (path.size() >= sizeof address.sun_path) {
        throw InvalidArgument(StatusCode::InvalidArgument, "socket path too long for AF_UNIX: " + path);
    }
    std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
    UniqueFd socket(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (!socket) {
        throw SystemError("socket(AF_UNIX, SOCK_SEQPACKET)", errno);
    }
    if (::connect(socket.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) < 0) {
        // EINTR: the connection goes on in the background; wait for it.
        if (errno != EINTR) {
            throw Unavailable(StatusCode::Unavailable,
                              "cannot reach dmabufd's fd socket " + path + ": " + std::strerror(errno));
        }
        pollfd entry{socket.get(), POLLOUT, 0};
        while (::poll(&entry, 1, -1) < 0 && errno == EINTR) {
        }
        int error = 0;
        socklen_t length = sizeof error;
        ::getsockopt(socket.get(), SOL_SOCKET, SO_ERROR, &error, &length);
        if (error != 0) {
            throw Unavailable(StatusCode::Unavailable,
                              "cannot reach dmabufd's fd socket " + path + ": " + std::strerror(error));
        }
    }
    return socket;
}

Received receive_message(int socket, ReceivedMessage& out) {
    ControlBuffer control;
    iovec data{out.data.data(), out.data.size()};
    msghdr message{};
    message.msg_iov = &data;
    message.msg_iovlen = 1;
    message.msg_control = control.bytes;
    message.msg_controllen = sizeof control.bytes;
    ssize_t length;
    do {
        // MSG_CMSG_CLOEXEC: a fork+exec elsewhere in the process can never
        // leak a buffer fd, not even between recvmsg and the next line.
        length = ::recvmsg(socket, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    } while (length < 0 && errno == EINTR);
    if (length < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return Received::WouldBlock;
        }
        if (errno == ECONNRESET) {
            return Received::Reset;
        }
        throw SystemError("recvmsg on dmabufd's fd socket", errno);
    }
    out.length = static_cast<std::size_t>(length);
    out.flags = message.msg_flags;
    out.fds.clear();
    for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) {
            continue;
        }
        const std::size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (std::size_t i = 0; i < count; ++i) {
            int fd;
            std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
            out.fds.emplace_back(fd);
        }
    }
    if (length == 0 && out.fds.empty()) {
        return Received::EndOfFile;
    }
    return Received::Message;
}

int send_frame(int socket, const void* frame, std::size_t length, int attached_fd) noexcept {
    iovec data{const_cast<void*>(frame), length};
    msghdr message{};
    message.msg_iov = &data;
    message.msg_iovlen = 1;
    union {
        char bytes[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    if (attached_fd >= 0) {
        std::memset(control.bytes, 0, sizeof control.bytes);
        message.msg_control = control.bytes;
        message.msg_controllen = sizeof control.bytes;
        cmsghdr* header = CMSG_FIRSTHDR(&message);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(header), &attached_fd, sizeof(int));
    }
    ssize_t sent;
    do {
        sent = ::sendmsg(socket, &message, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        return errno;
    }
    return static_cast<std::size_t>(sent) == length ? 0 : EMSGSIZE;
}

PollResult poll_readable(int socket, int wakeup, Clock::time_point deadline) {
    pollfd entries[2] = {{socket, POLLIN, 0}, {wakeup, POLLIN, 0}};
    const nfds_t count = wakeup >= 0 ? 2 : 1;
    while (true) {
        const auto left = deadline - Clock::now();
        // Rounded up, so a wait of 0.4 ms does not spin at timeout 0.
        const long long left_ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
        const int timeout = left_ms <= 0 ? 0 : static_cast<int>(std::min<long long>(left_ms, INT_MAX));
        const int ready = ::poll(entries, count, timeout);
        if (ready < 0) {
            if (errno == EINTR) {
                continue;
            }
            throw SystemError("poll of dmabufd's fd socket", errno);
        }
        PollResult result;
        result.socket_ready = (entries[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0;
        result.woken = count == 2 && (entries[1].revents & POLLIN) != 0;
        return result;
    }
}

UniqueFd make_eventfd() {
    UniqueFd event(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!event) {
        throw SystemError("eventfd", errno);
    }
    return event;
}

void signal_eventfd(int event) noexcept {
    const std::uint64_t one = 1;
    // EAGAIN means the counter is already huge: the waiter wakes anyway.
    while (::write(event, &one, sizeof one) < 0 && errno == EINTR) {
    }
}

void drain_eventfd(int event) noexcept {
    std::uint64_t count;
    while (::read(event, &count, sizeof count) < 0 && errno == EINTR) {
    }
}

}  // namespace dmabufd::detail
