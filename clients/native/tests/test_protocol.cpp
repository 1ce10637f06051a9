// The fd protocol at the byte level, with fd_protocol.h's structs and raw
// system calls only (no Session): what a C implementer would write.
#include <endian.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "dmabufd/dmabufd.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"
#include "support/raw_rpc.hpp"

namespace {

using dmabufd::UniqueFd;

struct RawMessage {
    std::vector<std::uint8_t> data;
    std::vector<UniqueFd> fds;
    int flags = 0;
};

UniqueFd raw_connect() {
    UniqueFd socket(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    CHECK(socket.valid());
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    const std::string path = dmabufd_test::runtime_dir() + "/" + DBFD_FD_SOCKET_NAME;
    CHECK(path.size() < sizeof address.sun_path);
    std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
    CHECK(::connect(socket.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) == 0);
    return socket;
}

// One message within `timeout_ms`; an empty `data` with no fds means none came.
RawMessage raw_receive(int socket, int timeout_ms) {
    RawMessage message;
    pollfd entry{socket, POLLIN, 0};
    if (::poll(&entry, 1, timeout_ms) != 1) {
        return message;
    }
    message.data.resize(DBFD_RECEIVE_BUFFER_BYTES);
    union {
        char bytes[CMSG_SPACE(DBFD_MAX_FDS_PER_FRAME * sizeof(int))];
        cmsghdr align;
    } control;
    iovec io{message.data.data(), message.data.size()};
    msghdr header{};
    header.msg_iov = &io;
    header.msg_iovlen = 1;
    header.msg_control = control.bytes;
    header.msg_controllen = sizeof control.bytes;
    const ssize_t length = ::recvmsg(socket, &header, MSG_CMSG_CLOEXEC);
    CHECK(length >= 0);
    message.data.resize(static_cast<std::size_t>(length));
    message.flags = header.msg_flags;
    for (cmsghdr* c = CMSG_FIRSTHDR(&header); c != nullptr; c = CMSG_NXTHDR(&header, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (std::size_t i = 0; i < count; ++i) {
                int fd;
                std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                message.fds.emplace_back(fd);
            }
        }
    }
    return message;
}

dbfd_header header_of(dbfd_frame_type type) {
    dbfd_header header{};
    std::memcpy(header.magic, DBFD_MAGIC, DBFD_MAGIC_BYTES);
    header.version = DBFD_VERSION;
    header.type = static_cast<std::uint8_t>(type);
    return header;
}

dbfd_hello raw_hello(int socket) {
    const RawMessage message = raw_receive(socket, 10000);
    CHECK_EQ(message.data.size(), std::size_t{DBFD_HELLO_BYTES});
    CHECK(message.fds.empty());
    dbfd_hello hello;
    std::memcpy(&hello, message.data.data(), sizeof hello);
    CHECK(std::memcmp(hello.header.magic, DBFD_MAGIC, DBFD_MAGIC_BYTES) == 0);
    CHECK_EQ(int{hello.header.version}, DBFD_VERSION);
    CHECK_EQ(int{hello.header.type}, int{DBFD_FRAME_HELLO});
    return hello;
}

void raw_send(int socket, const void* bytes, std::size_t length) {
    CHECK_EQ(::send(socket, bytes, length, MSG_NOSIGNAL), static_cast<ssize_t>(length));
}

// The ERROR frame answering a rejected frame: code INVALID_ARGUMENT.
std::string expect_error_frame(int socket) {
    const RawMessage message = raw_receive(socket, 10000);
    CHECK_MSG(message.data.size() >= DBFD_ERROR_HEAD_BYTES, "no ERROR frame came");
    CHECK(message.data.size() <= DBFD_ERROR_HEAD_BYTES + DBFD_ERROR_MESSAGE_MAX);
    CHECK(message.fds.empty());
    dbfd_error_head head;
    std::memcpy(&head, message.data.data(), sizeof head);
    CHECK_EQ(int{head.header.type}, int{DBFD_FRAME_ERROR});
    CHECK_EQ(le32toh(head.code), static_cast<std::uint32_t>(DBFD_STATUS_INVALID_ARGUMENT));
    return std::string(message.data.begin() + DBFD_ERROR_HEAD_BYTES, message.data.end());
}

}  // namespace

DMABUFD_TEST(protocol, raw_hello_names_this_process) {
    const UniqueFd socket = raw_connect();
    const dbfd_hello hello = raw_hello(socket.get());
    CHECK(le64toh(hello.session_id) >= 1);
    CHECK_EQ(static_cast<pid_t>(le32toh(static_cast<std::uint32_t>(hello.pid))), ::getpid());
    CHECK_EQ(static_cast<uid_t>(le32toh(static_cast<std::uint32_t>(hello.uid))), ::getuid());
    CHECK_EQ(static_cast<gid_t>(le32toh(static_cast<std::uint32_t>(hello.gid))), ::getgid());
    bool all_zero = true;
    for (std::uint8_t byte : hello.token) {
        all_zero = all_zero && byte == 0;
    }
    CHECK_MSG(!all_zero, "the session token is random, not zeros");
    // The daemon never sends a second HELLO.
    CHECK(raw_receive(socket.get(), 200).data.empty());
}

DMABUFD_TEST(protocol, rejected_frames_are_answered_with_error_frames) {
    const UniqueFd socket = raw_connect();
    raw_hello(socket.get());

    dbfd_ticket bad_magic{};
    bad_magic.header = header_of(DBFD_FRAME_TICKET);
    bad_magic.header.magic[0] = 'X';
    raw_send(socket.get(), &bad_magic, sizeof bad_magic);
    CHECK(!expect_error_frame(socket.get()).empty());

    dbfd_ticket short_ticket{};
    short_ticket.header = header_of(DBFD_FRAME_TICKET);
    raw_send(socket.get(), &short_ticket, sizeof short_ticket - 1);
    CHECK(!expect_error_frame(socket.get()).empty());

    dbfd_hello hello_from_client{};
    hello_from_client.header = header_of(DBFD_FRAME_HELLO);
    raw_send(socket.get(), &hello_from_client, sizeof hello_from_client);
    CHECK(!expect_error_frame(socket.get()).empty());

    dbfd_ticket wrong_version{};
    wrong_version.header = header_of(DBFD_FRAME_TICKET);
    wrong_version.header.version = DBFD_VERSION + 1;
    raw_send(socket.get(), &wrong_version, sizeof wrong_version);
    CHECK(!expect_error_frame(socket.get()).empty());

    // A good ticket is taken without a word.
    dbfd_ticket good{};
    good.header = header_of(DBFD_FRAME_TICKET);
    const dmabufd::Ticket ticket = dmabufd::random_ticket();
    std::memcpy(good.ticket, ticket.data(), ticket.size());
    raw_send(socket.get(), &good, sizeof good);
    CHECK(raw_receive(socket.get(), 300).data.empty());
}

DMABUFD_TEST(protocol, a_delivery_of_300_comes_in_frames_of_253) {
    // A session of our own over the raw socket, and the bare generated stub.
    const UniqueFd socket = raw_connect();
    const dbfd_hello hello = raw_hello(socket.get());
    const dmabufd::Ticket ticket = dmabufd::random_ticket();
    dbfd_ticket frame{};
    frame.header = header_of(DBFD_FRAME_TICKET);
    std::memcpy(frame.ticket, ticket.data(), ticket.size());
    raw_send(socket.get(), &frame, sizeof frame);

    auto stub = dmabufd_test::raw_stub();
    grpc::ClientContext context;
    context.AddMetadata(DBFD_SESSION_METADATA_KEY, dmabufd::to_hex(hello.token, DBFD_TOKEN_BYTES));
    context.AddMetadata(DBFD_TICKET_METADATA_KEY, dmabufd::to_hex(ticket));
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    dmabufd::v1::AllocateRequest request;
    request.set_size(4096);
    request.set_count(300);
    request.set_name("raw-300");
    dmabufd::v1::AllocateResponse response;
    const grpc::Status status = stub->Allocate(&context, request, &response);
    CHECK_MSG(status.ok(), status.error_message());
    CHECK_EQ(response.buffers_size(), 300);

    // Both frames were written before the response: they are queued now.
    std::uint32_t next_index = 0;
    for (const std::uint32_t expected_count : {253u, 47u}) {
        const RawMessage message = raw_receive(socket.get(), 0);
        CHECK_EQ(message.data.size(), std::size_t{DBFD_FDS_HEAD_BYTES + DBFD_FDS_ID_BYTES * expected_count});
        CHECK_EQ(message.flags & (MSG_CTRUNC | MSG_TRUNC), 0);
        dbfd_fds_head head;
        std::memcpy(&head, message.data.data(), sizeof head);
        CHECK_EQ(int{head.header.type}, int{DBFD_FRAME_FDS});
        CHECK(std::memcmp(head.ticket, ticket.data(), ticket.size()) == 0);
        CHECK_EQ(le32toh(head.first_index), next_index);
        CHECK_EQ(le32toh(head.total), 300u);
        CHECK_EQ(message.fds.size(), std::size_t{expected_count});
        for (std::uint32_t k = 0; k < expected_count; ++k) {
            std::uint64_t id;
            std::memcpy(&id, message.data.data() + DBFD_FDS_HEAD_BYTES + k * DBFD_FDS_ID_BYTES, sizeof id);
            const auto& info = response.buffers(static_cast<int>(next_index + k));
            CHECK_EQ(le64toh(id), info.id());
            struct stat status_of_fd {};
            CHECK(::fstat(message.fds[k].get(), &status_of_fd) == 0);
            CHECK_EQ(static_cast<std::uint64_t>(status_of_fd.st_ino), info.inode());
            CHECK((::fcntl(message.fds[k].get(), F_GETFD) & FD_CLOEXEC) != 0);
        }
        next_index += expected_count;
    }
    CHECK(raw_receive(socket.get(), 200).data.empty());
}

// On a device init makes both sockets in /dev/socket under its own names
// (android/dmabufd.rc); everywhere else they carry the runtime directory's.
DMABUFD_TEST(protocol, socket_names_follow_the_directory) {
    const dmabufd::SocketPaths android = dmabufd::socket_paths("/dev/socket");
    CHECK(android.control == "/dev/socket/dmabufd");
    CHECK(android.fd == "/dev/socket/dmabufd_fd");
    const dmabufd::SocketPaths run = dmabufd::socket_paths("/run/dmabufd");
    CHECK(run.control == "/run/dmabufd/dmabufd.sock");
    CHECK(run.fd == "/run/dmabufd/dmabufd.fd.sock");
}
