#include "dmabufd/client.hpp"

#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>

#include <unordered_map>
#include <utility>

#include "client_core.hpp"
#include "convert.hpp"
#include "delivery.hpp"
#include "dmabufd/errors.hpp"
#include "dmabufd/runtime_dir.hpp"

namespace dmabufd {

using detail::ClientCore;
using detail::Stub;

namespace {

// The control socket is local: reconnecting costs microseconds, so there
// is no reason to back off for seconds as gRPC does for remote servers.
// A subchannel pool of its own means a new Client never inherits the
// backoff of an earlier one whose daemon went away.
grpc::ChannelArguments channel_arguments() {
    grpc::ChannelArguments arguments;
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 50);
    arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
    return arguments;
}

std::function<Booking(std::uint64_t)> no_booking() {
    return [](std::uint64_t) { return Booking(); };
}

// A pool's frames as indexes into its buffer list.
std::vector<std::vector<std::size_t>> frame_indexes(const v1::PoolInfo& info, const std::vector<Buffer>& buffers) {
    std::unordered_map<std::uint64_t, std::size_t> index_of;
    for (std::size_t i = 0; i < buffers.size(); ++i) {
        index_of.emplace(buffers[i].id(), i);
    }
    std::vector<std::vector<std::size_t>> frames;
    for (const v1::PoolFrame& frame : info.frames()) {
        std::vector<std::size_t>& indexes = frames.emplace_back();
        for (std::uint64_t id : frame.buffer_ids()) {
            const auto found = index_of.find(id);
            if (found == index_of.end()) {
                throw ProtocolError("pool " + std::to_string(info.pool_id()) + " names buffer " + std::to_string(id) +
                                    " that was not delivered");
            }
            indexes.push_back(found->second);
        }
    }
    return frames;
}

Pool make_pool(const v1::PoolInfo& info, std::vector<Buffer> buffers, Booking booking) {
    std::vector<PlaneLayout> planes;
    for (const v1::PlaneLayout& plane : info.planes()) {
        planes.push_back(detail::from_message(plane));
    }
    auto frames = frame_indexes(info, buffers);
    return Pool(info.pool_id(), detail::from_message(info.format()), std::move(planes), std::move(buffers),
                std::move(frames), info.frame_bytes(), info.recycled(), std::move(booking));
}

Redeemed make_redeemed(ClientCore& core, const v1::RedeemResponse& response, const Ticket& ticket) {
    // Nothing is booked to the receiver: a lost delivery only uses up the grant.
    std::vector<Buffer> buffers = detail::match_delivery(core.take(ticket, static_cast<std::size_t>(response.buffers_size())),
                                                         response.buffers(), no_booking(), response.read_only());
    Redeemed redeemed;
    redeemed.grant_id = response.grant_id();
    redeemed.read_only = response.read_only();
    if (response.has_pool()) {
        redeemed.pool.emplace(make_pool(response.pool(), std::move(buffers), Booking()));
    } else {
        redeemed.buffers = std::move(buffers);
    }
    return redeemed;
}

GrantHandle grant_with(ClientCore& core, v1::GrantRequest& request, const GrantTo& to, bool read_only) {
    request.set_read_only(read_only);
    if (to.to_uid()) {
        request.set_uid(*to.to_uid());
    } else {
        request.set_token(true);
    }
    const v1::GrantResponse response = core.call(&Stub::async::Grant, request);
    return GrantHandle{response.grant_id(), response.token()};
}

}  // namespace

Client::Client(std::shared_ptr<ClientCore> core) : core_(std::move(core)) {}
Client::Client(Client&&) noexcept = default;
Client& Client::operator=(Client&&) noexcept = default;
Client::~Client() = default;

Client Client::connect(const ConnectOptions& options) {
    const std::string directory = options.runtime_dir.empty() ? default_runtime_dir() : options.runtime_dir;
    const SocketPaths sockets = socket_paths(directory);
    auto session = Session::connect(sockets.fd, options.reader, options.timeout);
    const std::string& control = sockets.control;
    auto channel = grpc::CreateCustomChannel("unix:" + control, grpc::InsecureChannelCredentials(), channel_arguments());
    // The fd socket answered, so the daemon is up: wait for the control
    // connection too, so a slow first connect is not the first call's failure.
    if (!channel->WaitForConnected(std::chrono::system_clock::now() + options.timeout)) {
        throw Unavailable(StatusCode::Unavailable, "dmabufd's control socket " + control + " did not answer in " +
                                                       std::to_string(options.timeout.count()) + " ms");
    }
    return Client(std::make_shared<ClientCore>(directory, std::move(session), std::move(channel), options.timeout));
}

Session& Client::session() { return core_->session(); }
const std::string& Client::runtime_dir() const { return core_->runtime_dir(); }

std::vector<HeapInfo> Client::heaps() {
    const v1::ListHeapsResponse response = core_->call(&Stub::async::ListHeaps, v1::ListHeapsRequest());
    std::vector<HeapInfo> heaps;
    for (const v1::Heap& heap : response.heaps()) {
        heaps.push_back(detail::from_message(heap));
    }
    return heaps;
}

Buffer Client::allocate(std::uint64_t size, const AllocateOptions& options) {
    std::vector<Buffer> buffers = allocate_batch(size, 1, options);
    return std::move(buffers.front());
}

std::vector<Buffer> Client::allocate_batch(std::uint64_t size, std::uint32_t count, const AllocateOptions& options) {
    if (count < 1) {
        // The daemon would take 0 as 1; a caller asking for none has a bug.
        throw InvalidArgument(StatusCode::InvalidArgument, "count must be at least 1");
    }
    v1::AllocateRequest request;
    request.set_size(size);
    request.set_count(count);
    request.set_heap(options.heap);
    request.set_usage(options.usage);
    request.set_name(options.name);
    Ticket ticket;
    const v1::AllocateResponse response = core_->call(&Stub::async::Allocate, request, &ticket);
    std::vector<std::uint64_t> ids;
    for (const v1::BufferInfo& info : response.buffers()) {
        ids.push_back(info.id());
    }
    try {
        const std::weak_ptr<detail::Releaser> releaser = core_->releaser();
        return detail::match_delivery(
            core_->take(ticket, ids.size()), response.buffers(),
            [&](std::uint64_t id) { return Booking(releaser, Booking::Kind::Buffer, id); }, false);
    } catch (const Error&) {
        // Booked to us, but we hold no fd for them (fd-protocol.md 5.4).
        core_->release_buffers_quietly(ids);
        throw;
    }
}

std::uint64_t Client::release(const std::vector<std::uint64_t>& buffer_ids) {
    v1::ReleaseRequest request;
    request.mutable_buffer_ids()->Add(buffer_ids.begin(), buffer_ids.end());
    return core_->call(&Stub::async::Release, request).released_bytes();
}

std::uint64_t Client::release_all(std::vector<Buffer> buffers) {
    std::vector<std::uint64_t> booked;
    for (Buffer& buffer : buffers) {
        if (buffer.booked()) {
            booked.push_back(buffer.id());
        }
        buffer.detach().reset();  // the fd closes first, then the release
    }
    return booked.empty() ? 0 : release(booked);
}

std::vector<BufferInfo> Client::buffers() {
    const v1::ListBuffersResponse response = core_->call(&Stub::async::ListBuffers, v1::ListBuffersRequest());
    std::vector<BufferInfo> infos;
    for (const v1::BufferInfo& info : response.buffers()) {
        infos.push_back(detail::from_message(info));
    }
    return infos;
}

BufferInfo Client::describe(std::uint64_t buffer_id) {
    v1::DescribeBufferRequest request;
    request.set_buffer_id(buffer_id);
    return detail::from_message(core_->call(&Stub::async::DescribeBuffer, request));
}

SessionStats Client::stats() {
    const v1::Stats stats = core_->call(&Stub::async::GetStats, v1::GetStatsRequest());
    const std::uint64_t session_id = core_->session().hello().session_id;
    for (const v1::ClientStats& client : stats.clients()) {
        if (client.session_id() == session_id) {
            return detail::from_message(client);
        }
    }
    throw ProtocolError("GetStats did not list this session (" + std::to_string(session_id) + ")");
}

Pool Client::allocate_pool(const PoolRequest& request) {
    v1::AllocatePoolRequest message;
    detail::to_message(request.format, *message.mutable_format());
    message.set_count(request.count);
    message.set_buffer_per_plane(request.buffer_per_plane);
    message.set_heap(request.heap);
    message.set_usage(request.usage);
    message.set_name(request.name);
    message.set_recycle(request.recycle);
    Ticket ticket;
    const v1::PoolInfo info = core_->call(&Stub::async::AllocatePool, message, &ticket);
    try {
        std::vector<Buffer> buffers = detail::match_delivery(
            core_->take(ticket, static_cast<std::size_t>(info.buffers_size())), info.buffers(), no_booking(), false);
        return make_pool(info, std::move(buffers),
                         Booking(core_->releaser(), Booking::Kind::Pool, info.pool_id()));
    } catch (const Error&) {
        // A pool's buffers go back together (Release of one fails BUFFER_BUSY).
        core_->release_pool_quietly(info.pool_id());
        throw;
    }
}

std::uint64_t Client::release_pool(std::uint64_t pool_id) {
    v1::ReleasePoolRequest request;
    request.set_pool_id(pool_id);
    return core_->call(&Stub::async::ReleasePool, request).released_bytes();
}

GrantHandle Client::grant(const std::vector<std::uint64_t>& buffer_ids, const GrantTo& to, bool read_only) {
    v1::GrantRequest request;
    request.mutable_buffer_ids()->Add(buffer_ids.begin(), buffer_ids.end());
    return grant_with(*core_, request, to, read_only);
}

GrantHandle Client::grant_pool(std::uint64_t pool_id, const GrantTo& to, bool read_only) {
    v1::GrantRequest request;
    request.set_pool_id(pool_id);
    return grant_with(*core_, request, to, read_only);
}

Redeemed Client::redeem(const std::string& token) {
    v1::RedeemRequest request;
    request.set_token(token);
    Ticket ticket;
    const v1::RedeemResponse response = core_->call(&Stub::async::Redeem, request, &ticket);
    return make_redeemed(*core_, response, ticket);
}

Redeemed Client::redeem(std::uint64_t grant_id) {
    v1::RedeemRequest request;
    request.set_grant_id(grant_id);
    Ticket ticket;
    const v1::RedeemResponse response = core_->call(&Stub::async::Redeem, request, &ticket);
    return make_redeemed(*core_, response, ticket);
}

void Client::revoke(std::uint64_t grant_id) {
    v1::RevokeRequest request;
    request.set_grant_id(grant_id);
    core_->call(&Stub::async::Revoke, request);
}

GrantList Client::grants() {
    const v1::ListGrantsResponse response = core_->call(&Stub::async::ListGrants, v1::ListGrantsRequest());
    GrantList list;
    for (const v1::GrantInfo& grant : response.offered()) {
        list.offered.push_back(detail::from_message(grant));
    }
    for (const v1::GrantInfo& grant : response.made()) {
        list.made.push_back(detail::from_message(grant));
    }
    return list;
}

}  // namespace dmabufd
