// The generated gRPC stub, used bare: for calls the Client would never
// make (no session metadata, a ticket the test controls).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "dmabufd/session.hpp"
#include "dmabufd/v1/dmabufd.grpc.pb.h"

namespace dmabufd_test {

// On a channel of its own, connected before it is returned.
std::unique_ptr<dmabufd::v1::BufferService::Stub> raw_stub();

// A context naming `session` and `ticket` in its metadata, 60 s deadline.
void name_session(grpc::ClientContext& context, dmabufd::Session& session, const dmabufd::Ticket& ticket);

}  // namespace dmabufd_test
