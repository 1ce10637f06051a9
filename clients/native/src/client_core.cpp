#include "client_core.hpp"

#include <utility>

namespace dmabufd::detail {

ClientCore::ClientCore(std::string runtime_dir, std::shared_ptr<Session> session,
                       std::shared_ptr<grpc::Channel> channel, std::chrono::milliseconds timeout)
    : runtime_dir_(std::move(runtime_dir)),
      session_(std::move(session)),
      channel_(std::move(channel)),
      stub_(v1::BufferService::NewStub(channel_)),
      timeout_(timeout) {}

std::vector<DeliveredFd> ClientCore::take(const Ticket& ticket, std::size_t count) {
    return session_->take(ticket, count, Clock::now() + timeout_);
}

void ClientCore::release_buffers(const std::vector<std::uint64_t>& buffer_ids) {
    v1::ReleaseRequest request;
    request.mutable_buffer_ids()->Add(buffer_ids.begin(), buffer_ids.end());
    call(&Stub::async::Release, request);
}

void ClientCore::release_pool(std::uint64_t pool_id) {
    v1::ReleasePoolRequest request;
    request.set_pool_id(pool_id);
    call(&Stub::async::ReleasePool, request);
}

void ClientCore::release_buffers_quietly(const std::vector<std::uint64_t>& buffer_ids) noexcept {
    try {
        release_buffers(buffer_ids);
    } catch (const std::exception&) {
        // The session's end releases them.
    }
}

void ClientCore::release_pool_quietly(std::uint64_t pool_id) noexcept {
    try {
        release_pool(pool_id);
    } catch (const std::exception&) {
        // The session's end releases it.
    }
}

}  // namespace dmabufd::detail
