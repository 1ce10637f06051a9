#include "raw_rpc.hpp"

#include <chrono>

#include "daemon_env.hpp"
#include "dmabufd/fd_protocol.h"
#include "harness.hpp"

namespace dmabufd_test {

std::unique_ptr<dmabufd::v1::BufferService::Stub> raw_stub() {
    auto channel = grpc::CreateChannel("unix:" + runtime_dir() + "/" + DBFD_CONTROL_SOCKET_NAME,
                                       grpc::InsecureChannelCredentials());
    // Connected now, so its fds are open before a test counts ours.
    CHECK(channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(60)));
    return dmabufd::v1::BufferService::NewStub(channel);
}

void name_session(grpc::ClientContext& context, dmabufd::Session& session, const dmabufd::Ticket& ticket) {
    context.AddMetadata(DBFD_SESSION_METADATA_KEY, session.token_hex());
    context.AddMetadata(DBFD_TICKET_METADATA_KEY, dmabufd::to_hex(ticket));
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
}

}  // namespace dmabufd_test
