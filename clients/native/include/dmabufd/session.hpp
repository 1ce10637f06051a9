// Session: this process's end of the daemon's fd socket.
//
// One connection to dmabufd.fd.sock: the HELLO (the session token), the
// tickets each call sends before it is made, and the FDS frames that
// bring the buffers' fds back, tagged with the ticket of the call they
// belong to. Frames of different calls arrive in any order, so ONE
// reader takes every frame off the socket and files it under its ticket;
// a call takes its own fds once its response has arrived.
//
// Threading. Every method is safe to call from any thread. The reader is
// one of:
//   ReaderMode::OwnThread  a thread of the session reads whenever the
//                          socket is readable; callers wait on a
//                          condition variable.
//   ReaderMode::External   no thread: the application's event loop polls
//                          pollable_fd() for POLLIN and calls dispatch().
//                          A thread that waits (for a call's response or
//                          its fds) reads the socket itself while no one
//                          else does, so a call made from the loop thread
//                          never deadlocks waiting for the loop.
// Either way the socket is drained while calls are in flight, so the
// daemon's outbox never fills because this process did not read.
//
// The kernel may drop a frame's fds (MSG_CTRUNC: RLIMIT_NOFILE reached).
// The session then closes those that arrived and marks the call's ticket
// lost: take() throws FdsLost, and the Client releases what the call
// booked (fd-protocol.md 5.4).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dmabufd/ticket.hpp"
#include "dmabufd/unique_fd.hpp"

namespace dmabufd {

enum class ReaderMode { OwnThread, External };

using Clock = std::chrono::steady_clock;

struct Hello {
    std::uint64_t session_id = 0;
    SessionToken token{};
    std::int32_t pid = 0;  // as the daemon saw them, for diagnosis
    std::int32_t uid = 0;
    std::int32_t gid = 0;
};

// One buffer of a delivery: its id and this process's fd for it.
struct DeliveredFd {
    std::uint64_t buffer_id = 0;
    UniqueFd fd;
};

// An ERROR frame: the daemon rejected a frame this client sent (it names
// no call, so no call fails because of it).
struct ErrorFrame {
    std::uint32_t code = 0;
    std::string message;
};

struct DispatchResult {
    std::size_t frames = 0;  // frames taken off the socket by this call
    bool ended = false;      // the session is over: stop polling its fd
};

class Session {
public:
    // Connects to the fd socket at `fd_socket_path` and reads HELLO within
    // `timeout`. Throws SessionEnded (closed before HELLO: refused or
    // stopping), the ERROR frame's class (PermissionDenied,
    // ResourceExhausted) when the daemon refuses, Unavailable, ProtocolError.
    static std::shared_ptr<Session> connect(const std::string& fd_socket_path, ReaderMode mode,
                                            std::chrono::milliseconds timeout);

    ~Session();  // stops the reader, closes the socket: the daemon ends the session
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    const Hello& hello() const noexcept;
    const std::string& token_hex() const noexcept;
    ReaderMode mode() const noexcept;

    // A fresh ticket, registered for delivery and sent (TICKET frame).
    Ticket send_ticket();
    // The same, carrying `file_fd` (FILE frame) for a load that reads it.
    Ticket send_file_ticket(int file_fd);

    // The `count` fds of the call that used `ticket`, in delivery order;
    // the ticket is done with afterwards. Throws FdsLost, SessionEnded,
    // ProtocolError, or DeadlineExceeded when they are not there by
    // `deadline` (they are queued before the call's response, so that
    // means a daemon bug).
    std::vector<DeliveredFd> take(const Ticket& ticket, std::size_t count, Clock::time_point deadline);
    // The call that used `ticket` failed or delivers nothing: close what
    // was filed for it; frames arriving for it later are closed on sight.
    void forget(const Ticket& ticket);

    // Blocks until `ready()` (evaluated under the session's lock: keep it
    // cheap, and never call the session from it) or `deadline`; false on
    // timeout. In External mode the waiting thread reads the socket.
    bool wait(const std::function<bool()>& ready, Clock::time_point deadline);
    // Makes waiters re-check their condition (from any thread).
    void wake();

    // External mode: poll this fd for POLLIN, then call dispatch(), which
    // reads every frame queued without blocking. It returns at once, having
    // read nothing, while a waiting call holds the reader role (that call
    // drains the socket). In OwnThread mode dispatch() reads nothing.
    int pollable_fd() const noexcept;
    DispatchResult dispatch();

    bool ended() const;
    // The last ERROR frames received (at most 64), oldest first.
    std::vector<ErrorFrame> error_frames() const;
    // How many ERROR frames arrived since the session opened, and those of
    // them still kept that arrived after the first `count`.
    std::uint64_t error_frame_count() const;
    std::vector<ErrorFrame> error_frames_since(std::uint64_t count) const;
    // Ids of buffers whose fds came for calls that had already failed
    // (closed on arrival). Those of an Allocate stay booked to the session
    // until released or until it ends. Returns and clears the list.
    std::vector<std::uint64_t> take_late_buffer_ids();

    struct Impl;

private:
    explicit Session(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
};

}  // namespace dmabufd
