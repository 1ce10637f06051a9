#include "dmabufd/session.hpp"

#include <sys/socket.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <variant>

#include "dmabufd/errors.hpp"
#include "frame_codec.hpp"
#include "socket_io.hpp"
#include "ticket_table.hpp"

namespace dmabufd {

namespace {

constexpr std::size_t kKeptErrorFrames = 64;
constexpr std::size_t kKeptLateIds = 4096;

// std::visit over several lambdas.
template <typename... Handlers>
struct Visitor : Handlers... {
    using Handlers::operator()...;
};
template <typename... Handlers>
Visitor(Handlers...) -> Visitor<Handlers...>;

Hello read_hello(int socket, std::chrono::milliseconds timeout) {
    const Clock::time_point deadline = Clock::now() + timeout;
    detail::ReceivedMessage message;
    while (true) {
        if (!detail::poll_readable(socket, -1, deadline).socket_ready) {
            throw Unavailable(StatusCode::Unavailable,
                              "dmabufd sent no HELLO within " + std::to_string(timeout.count()) + " ms");
        }
        switch (detail::receive_message(socket, message)) {
            case detail::Received::WouldBlock:
                continue;
            case detail::Received::EndOfFile:
            case detail::Received::Reset:
                throw SessionEnded(
                    "dmabufd closed the fd socket before its HELLO: it refused this client (its log says why) "
                    "or it is stopping");
            case detail::Received::Message:
                break;
        }
        if ((message.flags & (MSG_TRUNC | MSG_CTRUNC)) != 0 || !message.fds.empty()) {
            throw ProtocolError("dmabufd's first frame was truncated or carried fds");
        }
        const detail::DaemonFrame frame = detail::decode_daemon_frame(message.data.data(), message.length);
        if (const Hello* hello = std::get_if<Hello>(&frame)) {
            return *hello;
        }
        if (const ErrorFrame* error = std::get_if<ErrorFrame>(&frame)) {
            throw_status_error(static_cast<StatusCode>(error->code), "dmabufd refused the session: " + error->message);
        }
        if (const detail::BadFrame* bad = std::get_if<detail::BadFrame>(&frame)) {
            throw ProtocolError("dmabufd's first frame: " + bad->why);
        }
        throw ProtocolError("dmabufd's first frame was not HELLO");
    }
}

}  // namespace

struct Session::Impl {
    // Closed: the daemon closed it. Broken: the daemon broke the protocol.
    // Failed: reading the socket failed here.
    enum class End { Open, Closed, Broken, Failed };

    // Set in connect() and read-only afterwards: no lock needed.
    UniqueFd socket;
    Hello hello;
    std::string token_hex;
    ReaderMode mode = ReaderMode::OwnThread;
    UniqueFd wakeup;  // External: interrupts the poll of the waiter that reads
    UniqueFd stop;    // OwnThread: tells the reader thread to stop
    std::thread reader;

    // Guards every member below it. Never held across a system call that
    // can block: a reader takes a message off the socket first and locks
    // to file it, and fds to close are collected and closed after
    // unlocking.
    mutable std::mutex mutex;
    // Notified when a frame is filed or a ticket lost, when the session
    // ends, when the reader role is given back, and by wake().
    std::condition_variable changed;
    detail::TicketTable table;
    bool reading = false;  // External mode: a thread holds the reader role
    End end = End::Open;
    std::string end_reason;
    std::deque<ErrorFrame> error_frames;  // the last kKeptErrorFrames
    std::uint64_t error_frames_total = 0;
    std::vector<std::uint64_t> late_ids;

    // The reader's own: only the thread that reads (the reader thread, or
    // the holder of the reader role) touches them.
    detail::ReceivedMessage inbox;
    bool reset_seen = false;

    void end_locked(End how, std::string reason) {
        if (end == End::Open) {
            end = how;
            end_reason = std::move(reason);
        }
    }

    void end_and_shut_down(End how, std::string reason) {
        {
            std::lock_guard<std::mutex> lock(mutex);
            end_locked(how, std::move(reason));
        }
        changed.notify_all();
        // The daemon sees end of file and ends the session; a reader
        // polling this socket wakes up.
        ::shutdown(socket.get(), SHUT_RDWR);
    }

    bool is_open() const {
        std::lock_guard<std::mutex> lock(mutex);
        return end == End::Open;
    }

    // Files one message. Returns false when it broke the protocol.
    bool handle(detail::ReceivedMessage& message) {
        std::vector<UniqueFd> discard;  // closed after the lock is gone, before waiters wake
        detail::DaemonFrame frame = detail::decode_daemon_frame(message.data.data(), message.length);
        if ((message.flags & MSG_TRUNC) != 0) {
            frame = detail::BadFrame{"a frame longer than any frame (MSG_TRUNC)"};
        }
        const bool fds_cut = (message.flags & MSG_CTRUNC) != 0;
        std::string broken;
        {
            std::lock_guard<std::mutex> lock(mutex);
            std::visit(Visitor{
                           [&](const Hello&) { broken = "a second HELLO"; },
                           [&](ErrorFrame& error) {
                               if (!message.fds.empty() || fds_cut) {
                                   broken = "an ERROR frame with fds";
                                   return;
                               }
                               if (error_frames.size() == kKeptErrorFrames) {
                                   error_frames.pop_front();
                               }
                               error_frames.push_back(std::move(error));
                               ++error_frames_total;
                           },
                           [&](detail::FdsFrame& fds) { broken = file_locked(fds, message.fds, fds_cut, discard); },
                           [&](detail::BadFrame& bad) { broken = std::move(bad.why); },
                       },
                       frame);
            for (UniqueFd& fd : message.fds) {
                discard.push_back(std::move(fd));
            }
            message.fds.clear();
        }
        // Closed before waiters wake: a call told its fds were lost must
        // find them closed (it may retry at once, at its fd limit).
        discard.clear();
        changed.notify_all();
        if (!broken.empty()) {
            end_and_shut_down(End::Broken, "dmabufd broke the fd protocol: " + broken);
            return false;
        }
        return true;
    }

    // Returns why the frame breaks the protocol, or "".
    std::string file_locked(const detail::FdsFrame& frame, std::vector<UniqueFd>& fds, bool fds_cut,
                            std::vector<UniqueFd>& discard) {
        if (fds_cut) {
            // The data is intact, so the ticket is known: the call is lost,
            // not the session (fd-protocol.md 5.4).
            if (!table.state(frame.ticket).expected) {
                note_late_locked(frame.buffer_ids);
            }
            table.mark_lost(frame.ticket, discard);
            return "";
        }
        if (fds.size() != frame.buffer_ids.size()) {
            return "an FDS frame with " + std::to_string(fds.size()) + " fds for " +
                   std::to_string(frame.buffer_ids.size()) + " ids";
        }
        switch (table.file(frame, fds, discard)) {
            case detail::TicketTable::Filed::Yes:
                return "";
            case detail::TicketTable::Filed::NotExpected:
                note_late_locked(frame.buffer_ids);
                return "";
            case detail::TicketTable::Filed::Inconsistent:
                break;
        }
        return "an FDS frame that contradicts the earlier frames of its call";
    }

    void note_late_locked(const std::vector<std::uint64_t>& ids) {
        for (std::uint64_t id : ids) {
            if (late_ids.size() < kKeptLateIds) {
                late_ids.push_back(id);
            }
        }
    }

    // Reads every queued message without blocking; returns how many.
    std::size_t drain() {
        std::size_t handled = 0;
        while (true) {
            detail::Received received;
            try {
                received = detail::receive_message(socket.get(), inbox);
            } catch (const SystemError& error) {
                end_and_shut_down(End::Failed, error.what());
                return handled;
            }
            switch (received) {
                case detail::Received::WouldBlock:
                    return handled;
                case detail::Received::Reset:
                    // Frames may still be queued behind the reset: read
                    // on until end of file (fd-protocol.md 1.4). A second
                    // reset in a row is the end.
                    if (!std::exchange(reset_seen, true)) {
                        continue;
                    }
                    [[fallthrough]];
                case detail::Received::EndOfFile:
                    {
                        std::lock_guard<std::mutex> lock(mutex);
                        end_locked(End::Closed,
                                   "dmabufd closed the fd socket: the daemon stopped, or ended this session");
                    }
                    changed.notify_all();
                    return handled;
                case detail::Received::Message:
                    reset_seen = false;
                    ++handled;
                    if (!handle(inbox)) {
                        return handled;
                    }
                    break;
            }
        }
    }

    // One wait of the reader-role holder: poll until readable, woken or
    // `deadline`, then read what is queued. Never throws: a failure ends
    // the session, which every waiter sees.
    void read_until(Clock::time_point deadline) noexcept {
        try {
            const detail::PollResult ready = detail::poll_readable(socket.get(), wakeup.get(), deadline);
            if (ready.woken) {
                detail::drain_eventfd(wakeup.get());
            }
            if (ready.socket_ready) {
                drain();
            }
        } catch (const std::exception& error) {
            end_and_shut_down(End::Failed, std::string("reading the fd socket failed: ") + error.what());
        }
    }

    void reader_loop() noexcept {
        try {
            while (is_open()) {
                const detail::PollResult ready =
                    detail::poll_readable(socket.get(), stop.get(), Clock::time_point::max());
                if (ready.woken) {
                    return;
                }
                if (ready.socket_ready) {
                    drain();
                }
            }
        } catch (const std::exception& error) {
            end_and_shut_down(End::Failed, std::string("the fd socket's reader failed: ") + error.what());
        }
    }
};

Session::Session(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::shared_ptr<Session> Session::connect(const std::string& fd_socket_path, ReaderMode mode,
                                          std::chrono::milliseconds timeout) {
    auto impl = std::make_unique<Impl>();
    impl->mode = mode;
    impl->socket = detail::connect_fd_socket(fd_socket_path);
    impl->hello = read_hello(impl->socket.get(), timeout);
    impl->token_hex = to_hex(impl->hello.token);
    if (mode == ReaderMode::External) {
        impl->wakeup = detail::make_eventfd();
    } else {
        impl->stop = detail::make_eventfd();
    }
    std::shared_ptr<Session> session(new Session(std::move(impl)));
    if (mode == ReaderMode::OwnThread) {
        Impl* state = session->impl_.get();
        state->reader = std::thread([state] { state->reader_loop(); });
    }
    return session;
}

Session::~Session() {
    if (impl_->reader.joinable()) {
        detail::signal_eventfd(impl_->stop.get());
        impl_->reader.join();
    }
    std::vector<UniqueFd> discard;
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->table.clear(discard);
}

const Hello& Session::hello() const noexcept { return impl_->hello; }
const std::string& Session::token_hex() const noexcept { return impl_->token_hex; }
ReaderMode Session::mode() const noexcept { return impl_->mode; }
int Session::pollable_fd() const noexcept { return impl_->socket.get(); }

Ticket Session::send_ticket() { return send_file_ticket(-1); }

Ticket Session::send_file_ticket(int file_fd) {
    Impl& state = *impl_;
    const Ticket ticket = random_ticket();
    {
        std::lock_guard<std::mutex> lock(state.mutex);
        if (state.end != Impl::End::Open) {
            throw SessionEnded("the session is over: " + state.end_reason);
        }
        state.table.expect(ticket);
    }
    const dbfd_ticket frame = detail::encode_ticket(file_fd >= 0 ? DBFD_FRAME_FILE : DBFD_FRAME_TICKET, ticket);
    const int error = detail::send_frame(state.socket.get(), &frame, sizeof frame, file_fd);
    if (error != 0) {
        forget(ticket);
        if (error == EPIPE || error == ECONNRESET || error == ENOTCONN) {
            throw SessionEnded(std::string("dmabufd's fd socket is closed: ") + std::strerror(error));
        }
        throw SystemError("sending a ticket on dmabufd's fd socket", error);
    }
    return ticket;
}

std::vector<DeliveredFd> Session::take(const Ticket& ticket, std::size_t count, Clock::time_point deadline) {
    Impl& state = *impl_;
    wait(
        [&] {
            const auto delivery = state.table.state(ticket);
            return count == 0 || !delivery.expected || delivery.complete || delivery.lost ||
                   state.end != Impl::End::Open;
        },
        deadline);
    std::vector<UniqueFd> discard;  // closed after the lock is released
    std::lock_guard<std::mutex> lock(state.mutex);
    const auto delivery = state.table.state(ticket);
    if (count == 0) {
        state.table.forget(ticket, discard);
        return {};
    }
    if (delivery.complete) {
        if (delivery.total != count) {
            state.table.forget(ticket, discard);
            throw ProtocolError("dmabufd delivered " + std::to_string(delivery.total) + " fds for a call of " +
                                std::to_string(count) + " buffers");
        }
        return state.table.take(ticket);
    }
    state.table.forget(ticket, discard);
    if (delivery.lost) {
        throw FdsLost(
            "the kernel dropped fds of this call (MSG_CTRUNC): the process is at its RLIMIT_NOFILE; "
            "the fds that arrived were closed");
    }
    if (!delivery.expected) {
        throw InvalidArgument(StatusCode::InvalidArgument, "take() of a ticket this session did not send");
    }
    if (state.end == Impl::End::Broken) {
        throw ProtocolError(state.end_reason);
    }
    if (state.end != Impl::End::Open) {
        throw SessionEnded(state.end_reason);
    }
    throw DeadlineExceeded(StatusCode::DeadlineExceeded,
                           "dmabufd answered the call but its fds did not arrive in time");
}

void Session::forget(const Ticket& ticket) {
    std::vector<UniqueFd> discard;  // closed after the lock is released
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->table.forget(ticket, discard);
}

bool Session::wait(const std::function<bool()>& ready, Clock::time_point deadline) {
    Impl& state = *impl_;
    std::unique_lock<std::mutex> lock(state.mutex);
    while (true) {
        if (ready()) {
            return true;
        }
        if (Clock::now() >= deadline) {
            return false;
        }
        if (state.mode == ReaderMode::External && !state.reading && state.end == Impl::End::Open) {
            // Nobody reads the socket now: this thread does, so no call
            // waits for an event loop that may be this very thread.
            state.reading = true;
            lock.unlock();
            state.read_until(deadline);
            lock.lock();
            state.reading = false;
            state.changed.notify_all();
        } else {
            state.changed.wait_until(lock, deadline);
        }
    }
}

void Session::wake() {
    {
        // Taken so that a waiter between checking its condition and
        // sleeping cannot miss the notification.
        std::lock_guard<std::mutex> lock(impl_->mutex);
    }
    impl_->changed.notify_all();
    if (impl_->wakeup) {
        detail::signal_eventfd(impl_->wakeup.get());
    }
}

DispatchResult Session::dispatch() {
    Impl& state = *impl_;
    DispatchResult result;
    {
        std::lock_guard<std::mutex> lock(state.mutex);
        if (state.mode != ReaderMode::External || state.reading || state.end != Impl::End::Open) {
            result.ended = state.end != Impl::End::Open;
            return result;
        }
        state.reading = true;
    }
    try {
        result.frames = state.drain();
    } catch (const std::exception& error) {
        state.end_and_shut_down(Impl::End::Failed, std::string("reading the fd socket failed: ") + error.what());
    }
    {
        std::lock_guard<std::mutex> lock(state.mutex);
        state.reading = false;
        result.ended = state.end != Impl::End::Open;
    }
    state.changed.notify_all();
    return result;
}

bool Session::ended() const { return !impl_->is_open(); }

std::vector<ErrorFrame> Session::error_frames() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return {impl_->error_frames.begin(), impl_->error_frames.end()};
}

std::uint64_t Session::error_frame_count() const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return impl_->error_frames_total;
}

std::vector<ErrorFrame> Session::error_frames_since(std::uint64_t count) const {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    const std::deque<ErrorFrame>& kept = impl_->error_frames;
    const std::uint64_t first_kept = impl_->error_frames_total - kept.size();
    const std::uint64_t skip = count > first_kept ? count - first_kept : 0;
    if (skip >= kept.size()) {
        return {};
    }
    return {kept.begin() + static_cast<std::ptrdiff_t>(skip), kept.end()};
}

std::vector<std::uint64_t> Session::take_late_buffer_ids() {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    return std::exchange(impl_->late_ids, {});
}

}  // namespace dmabufd
