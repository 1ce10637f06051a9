// The shared state behind a Client: its session, channel and stub, and
// the call wrapper every RPC goes through.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dmabufd/booking.hpp"
#include "dmabufd/session.hpp"
#include "rpc_error.hpp"
#include "unary_call.hpp"

namespace dmabufd::detail {

class ClientCore final : public Releaser, public std::enable_shared_from_this<ClientCore> {
public:
    ClientCore(std::string runtime_dir, std::shared_ptr<Session> session, std::shared_ptr<grpc::Channel> channel,
               std::chrono::milliseconds timeout);

    Session& session() noexcept { return *session_; }
    const std::string& runtime_dir() const noexcept { return runtime_dir_; }

    // Sends a fresh ticket, then makes the call with the session metadata
    // and the timeout as its deadline. A failed call throws its typed
    // error, with the ERROR frames that came meanwhile (its ticket is
    // forgotten, so late fds are closed on arrival).
    // With `delivery` the ticket is returned there for take(); without,
    // the call delivers no fds and the ticket is done with.
    template <typename Request, typename Response>
    Response call(AsyncUnary<Request, Response> method, const Request& request, Ticket* delivery = nullptr) {
        const std::uint64_t rejections_before = session_->error_frame_count();
        const Ticket ticket = session_->send_ticket();
        try {
            grpc::ClientContext context;
            context.AddMetadata(DBFD_SESSION_METADATA_KEY, session_->token_hex());
            context.AddMetadata(DBFD_TICKET_METADATA_KEY, to_hex(ticket));
            context.set_deadline(std::chrono::system_clock::now() + timeout_);
            Response response;
            const grpc::Status status = run_unary(*session_, *stub_, method, context, request, response);
            if (!status.ok()) {
                throw_rpc_error(status, session_->error_frames_since(rejections_before));
            }
            if (delivery != nullptr) {
                *delivery = ticket;
            } else {
                session_->forget(ticket);
            }
            return response;
        } catch (...) {
            session_->forget(ticket);
            throw;
        }
    }

    // The `count` fds of the call that used `ticket` (already queued: the
    // daemon writes them before it answers).
    std::vector<DeliveredFd> take(const Ticket& ticket, std::size_t count);

    std::weak_ptr<Releaser> releaser() { return weak_from_this(); }
    void release_buffers(const std::vector<std::uint64_t>& buffer_ids) override;
    void release_pool(std::uint64_t pool_id) override;
    // For cleaning up after a delivery failed: errors would hide the first one.
    void release_buffers_quietly(const std::vector<std::uint64_t>& buffer_ids) noexcept;
    void release_pool_quietly(std::uint64_t pool_id) noexcept;

    Stub& stub() noexcept { return *stub_; }

private:
    std::string runtime_dir_;
    std::shared_ptr<Session> session_;
    std::shared_ptr<grpc::Channel> channel_;
    std::unique_ptr<Stub> stub_;
    std::chrono::milliseconds timeout_;
};

}  // namespace dmabufd::detail
