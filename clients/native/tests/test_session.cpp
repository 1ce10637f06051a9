// The session: HELLO, tickets, the reader in both modes, ERROR frames,
// late frames, the session's end.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cstring>
#include <set>
#include <thread>

#include "dmabufd/dmabufd.hpp"
#include "frame_codec.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"
#include "support/pattern.hpp"
#include "support/raw_rpc.hpp"

namespace {

using dmabufd::ReaderMode;

void send_bad_frame(int socket) {
    // Bad magic: rejected with an ERROR frame, counted as a protocol error.
    dbfd_ticket frame = dmabufd::detail::encode_ticket(DBFD_FRAME_TICKET, dmabufd::random_ticket());
    frame.header.magic[0] = 'X';
    CHECK_EQ(::send(socket, &frame, sizeof frame, MSG_NOSIGNAL), static_cast<ssize_t>(sizeof frame));
}

bool readable_now(int fd) {
    pollfd entry{fd, POLLIN, 0};
    return ::poll(&entry, 1, 0) == 1 && (entry.revents & POLLIN) != 0;
}

// Allocates `count` buffers with the bare stub, naming `session` and the
// ticket it sent: the session's reader gets the frames, nobody takes them.
// (The stub is the caller's: a channel's fds come and go with it.)
dmabufd::v1::AllocateResponse raw_allocate(dmabufd::v1::BufferService::Stub& stub, dmabufd::Session& session,
                                           const dmabufd::Ticket& ticket, std::uint32_t count) {
    grpc::ClientContext context;
    dmabufd_test::name_session(context, session, ticket);
    dmabufd::v1::AllocateRequest request;
    request.set_size(4096);
    request.set_count(count);
    request.set_name("raw");
    dmabufd::v1::AllocateResponse response;
    const grpc::Status status = stub.Allocate(&context, request, &response);
    CHECK_MSG(status.ok(), status.error_message());
    CHECK_EQ(response.buffers_size(), static_cast<int>(count));
    return response;
}

std::shared_ptr<dmabufd::Session> raw_session(ReaderMode mode) {
    return dmabufd::Session::connect(dmabufd_test::runtime_dir() + "/" + DBFD_FD_SOCKET_NAME, mode,
                                     std::chrono::seconds(60));
}

}  // namespace

DMABUFD_TEST(session, hello_names_this_process_and_a_token) {
    dmabufd::Client first = dmabufd_test::connect();
    dmabufd::Client second = dmabufd_test::connect();
    const dmabufd::Hello& hello = first.session().hello();
    CHECK(hello.session_id >= 1);
    CHECK_EQ(hello.pid, ::getpid());
    CHECK_EQ(static_cast<uid_t>(hello.uid), ::getuid());
    CHECK_EQ(static_cast<gid_t>(hello.gid), ::getgid());
    const std::string& token = first.session().token_hex();
    CHECK_EQ(token.size(), std::size_t{2 * DBFD_TOKEN_BYTES});
    for (char digit : token) {
        CHECK(std::isxdigit(static_cast<unsigned char>(digit)) && !std::isupper(static_cast<unsigned char>(digit)));
    }
    CHECK_EQ(token, dmabufd::to_hex(hello.token));
    CHECK(second.session().hello().session_id != hello.session_id);
    CHECK(second.session().token_hex() != token);
    // The session's stats know it by the HELLO's id.
    CHECK_EQ(first.stats().session_id, hello.session_id);
}

DMABUFD_TEST(session, tickets_are_fresh_for_every_call) {
    auto session = raw_session(ReaderMode::OwnThread);
    auto stub = dmabufd_test::raw_stub();
    std::set<std::string> seen;
    for (int i = 0; i < 200; ++i) {
        const dmabufd::Ticket ticket = session->send_ticket();
        CHECK(seen.insert(dmabufd::to_hex(ticket)).second);
        session->forget(ticket);
    }
    // A call on the same socket: its fds come after any ERROR frame the
    // tickets above drew (a repeated or malformed one would have).
    const dmabufd::Ticket last = session->send_ticket();
    raw_allocate(*stub, *session, last, 1);
    CHECK_EQ(session->take(last, 1, dmabufd::Clock::now() + std::chrono::seconds(30)).size(), std::size_t{1});
    CHECK(session->error_frames().empty());
}

DMABUFD_TEST(session, an_error_frame_fails_no_call) {
    dmabufd::Client client = dmabufd_test::connect();
    send_bad_frame(client.session().pollable_fd());
    // The daemon answers frames in order, so the ERROR frame is read
    // before this call's fds: the call must not fail for it.
    dmabufd::Buffer buffer = client.allocate(4096);
    CHECK(buffer.fd() >= 0);
    const auto errors = client.session().error_frames();
    CHECK_EQ(errors.size(), std::size_t{1});
    CHECK_EQ(errors[0].code, static_cast<std::uint32_t>(DBFD_STATUS_INVALID_ARGUMENT));
    CHECK(!errors[0].message.empty());
    CHECK(!client.session().ended());
}

DMABUFD_TEST(session, the_64th_protocol_error_ends_the_session) {
    dmabufd::Client client = dmabufd_test::connect();
    for (int i = 0; i < DBFD_MAX_PROTOCOL_ERRORS; ++i) {
        send_bad_frame(client.session().pollable_fd());
    }
    for (int waited = 0; !client.session().ended() && waited < 1000; ++waited) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK_MSG(client.session().ended(), "the daemon ends a session at its 64th rejected frame");
    CHECK_EQ(client.session().error_frames().size(), std::size_t{DBFD_MAX_PROTOCOL_ERRORS - 1});
    EXPECT_THROW(dmabufd::SessionEnded, client.allocate(4096));
    // A new session works at once.
    dmabufd::Client again = dmabufd_test::connect();
    again.allocate(4096);
}

DMABUFD_TEST(session, external_mode_leaves_frames_for_the_event_loop) {
    auto session = raw_session(ReaderMode::External);
    auto stub = dmabufd_test::raw_stub();
    const int baseline = dmabufd_test::open_fd_count();
    const dmabufd::Ticket ticket = session->send_ticket();
    const auto response = raw_allocate(*stub, *session, ticket, 300);
    // No thread of the session read them: both frames wait in the socket.
    CHECK(readable_now(session->pollable_fd()));
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
    const dmabufd::DispatchResult first = session->dispatch();
    CHECK_EQ(first.frames, std::size_t{2});
    CHECK(!first.ended);
    CHECK(!readable_now(session->pollable_fd()));
    CHECK_EQ(session->dispatch().frames, std::size_t{0});
    // Filed already: take() needs no time at all.
    auto delivered = session->take(ticket, 300, dmabufd::Clock::now());
    CHECK_EQ(delivered.size(), std::size_t{300});
    for (int i = 0; i < 300; ++i) {
        CHECK_EQ(delivered[static_cast<std::size_t>(i)].buffer_id, response.buffers(i).id());
    }
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline + 300);
    delivered.clear();
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
}

DMABUFD_TEST(session, own_thread_mode_reads_by_itself) {
    auto session = raw_session(ReaderMode::OwnThread);
    auto stub = dmabufd_test::raw_stub();
    const dmabufd::Ticket ticket = session->send_ticket();
    raw_allocate(*stub, *session, ticket, 3);
    // dispatch() is the event loop's, not this mode's: it reads nothing...
    const dmabufd::DispatchResult result = session->dispatch();
    CHECK_EQ(result.frames, std::size_t{0});
    CHECK(!result.ended);
    // ...and the session's thread has read the frame anyway.
    CHECK_EQ(session->take(ticket, 3, dmabufd::Clock::now() + std::chrono::seconds(30)).size(), std::size_t{3});
}

DMABUFD_TEST(session, external_mode_calls_read_the_socket_themselves) {
    // Nobody calls dispatch(): a call made on the event loop's own thread
    // must still get its fds (it reads while it waits).
    dmabufd::Client client = dmabufd_test::connect(ReaderMode::External);
    const int baseline = dmabufd_test::open_fd_count();
    for (std::uint32_t round = 0; round < 20; ++round) {
        std::vector<dmabufd::Buffer> buffers = client.allocate_batch(8192, 5);
        for (std::size_t i = 0; i < buffers.size(); ++i) {
            dmabufd::Mapping mapping = buffers[i].map(dmabufd::Access::ReadWrite);
            dmabufd_test::fill_pattern(mapping.data(), mapping.size(), round * 10 + static_cast<std::uint32_t>(i));
        }
        for (std::size_t i = 0; i < buffers.size(); ++i) {
            const dmabufd::Mapping mapping = buffers[i].map(dmabufd::Access::Read);
            CHECK_EQ(dmabufd_test::first_mismatch(mapping.data(), mapping.size(),
                                                  round * 10 + static_cast<std::uint32_t>(i)),
                     mapping.size());
        }
    }
    CHECK(client.buffers().empty());
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
}

DMABUFD_TEST(session, external_mode_with_an_event_loop_and_workers) {
    dmabufd::Client client = dmabufd_test::connect(ReaderMode::External);
    dmabufd::Session& session = client.session();
    auto stub = dmabufd_test::raw_stub();
    std::atomic<bool> stop{false};
    std::atomic<std::size_t> dispatched{0};
    std::thread loop([&] {
        while (!stop.load()) {
            pollfd entry{session.pollable_fd(), POLLIN, 0};
            if (::poll(&entry, 1, 20) == 1) {
                const dmabufd::DispatchResult result = session.dispatch();
                dispatched += result.frames;
                if (result.ended) {
                    return;
                }
            }
        }
    });
    std::atomic<int> failures{0};
    std::vector<std::thread> workers;
    for (int worker = 0; worker < 4; ++worker) {
        workers.emplace_back([&, worker] {
            try {
                for (int round = 0; round < 10; ++round) {
                    auto buffers = client.allocate_batch(4096, 4 + static_cast<std::uint32_t>(worker));
                    if (buffers.size() != 4u + static_cast<unsigned>(worker)) {
                        ++failures;
                    }
                }
            } catch (const std::exception&) {
                ++failures;
            }
        });
    }
    for (std::thread& worker : workers) {
        worker.join();
    }
    CHECK_EQ(failures.load(), 0);
    // A frame no thread waits for: only the loop reads it.
    const std::size_t before = dispatched.load();
    const dmabufd::Ticket ticket = session.send_ticket();
    raw_allocate(*stub, session, ticket, 2);
    for (int waited = 0; dispatched.load() == before && waited < 3000; ++waited) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK_MSG(dispatched.load() > before, "the event loop read the frame through dispatch()");
    auto delivered = session.take(ticket, 2, dmabufd::Clock::now());
    stop = true;
    loop.join();
    CHECK_EQ(delivered.size(), std::size_t{2});
    CHECK(!session.ended());
}

DMABUFD_TEST(session, frames_for_a_forgotten_ticket_are_closed_on_arrival) {
    dmabufd::Client client = dmabufd_test::connect();
    dmabufd::Session& session = client.session();
    auto stub = dmabufd_test::raw_stub();
    const int baseline = dmabufd_test::open_fd_count();
    const dmabufd::Ticket ticket = session.send_ticket();
    session.forget(ticket);  // as after a failed or cancelled call
    const auto response = raw_allocate(*stub, session, ticket, 4);
    // A later call's fds come after the late ones: once it has them, the
    // late frame has been read, and closed.
    client.allocate(4096).release();
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
    const std::vector<std::uint64_t> late = session.take_late_buffer_ids();
    CHECK_EQ(late.size(), std::size_t{4});
    for (int i = 0; i < 4; ++i) {
        CHECK_EQ(late[static_cast<std::size_t>(i)], response.buffers(i).id());
    }
    CHECK(session.take_late_buffer_ids().empty());
    // Still booked to the session (an Allocate's): release them.
    CHECK_EQ(client.buffers().size(), std::size_t{4});
    client.release(late);
    CHECK(client.buffers().empty());
}

DMABUFD_TEST(session, a_call_whose_ticket_is_rejected_reports_the_error_frame) {
    dmabufd::Client client = dmabufd_test::connect();
    // 256 tickets outstanding (never used): the next, this call's own, is
    // rejected with an ERROR frame, and the call fails once its 2 s wait
    // for the ticket is over. Only then is the ERROR frame reported.
    for (int i = 0; i < DBFD_MAX_OUTSTANDING_TICKETS; ++i) {
        client.session().forget(client.session().send_ticket());
    }
    const auto error = EXPECT_THROW(dmabufd::SessionInvalid, client.buffers());
    CHECK_EQ(error.reason(), std::string("SESSION_INVALID"));
    CHECK_EQ(error.rejected_frames().size(), std::size_t{1});
    CHECK(error.rejected_frames()[0].rfind(std::to_string(DBFD_STATUS_INVALID_ARGUMENT) + ": ", 0) == 0);
    CHECK(std::string(error.what()).find("rejected frames of this session") != std::string::npos);
    CHECK_EQ(client.session().error_frame_count(), std::uint64_t{1});
    CHECK(!client.session().ended());
}
