// One unary gRPC call whose wait lets the session read its fd socket.
//
// The call is made with gRPC's callback API and the calling thread waits
// through Session::wait(): in External mode that thread reads the fd
// socket while the response is on its way, so the daemon (which writes a
// call's fds before answering it) never waits for a reader that is
// blocked in this very call.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <thread>
#include <utility>

#include "dmabufd/session.hpp"
#include "dmabufd/v1/dmabufd.grpc.pb.h"

namespace dmabufd::detail {

using Stub = v1::BufferService::Stub;

template <typename Request, typename Response>
using AsyncUnary = void (Stub::async::*)(grpc::ClientContext*, const Request*, Response*,
                                         std::function<void(grpc::Status)>);

// Shared with gRPC's callback, which may still run after the waiter saw `done`.
struct UnaryCompletion {
    grpc::Status status;                // written before `done`
    std::atomic<bool> done{false};      // the status is there
    std::atomic<bool> finished{false};  // the callback no longer touches the session
};

// Runs `method` and returns its status once gRPC has finished with
// `context`, `request` and `response` (the context's deadline bounds it).
template <typename Request, typename Response>
grpc::Status run_unary(Session& session, Stub& stub, AsyncUnary<Request, Response> method,
                       grpc::ClientContext& context, const Request& request, Response& response) {
    auto completion = std::make_shared<UnaryCompletion>();
    Session* waiter = &session;
    (stub.async()->*method)(&context, &request, &response, [completion, waiter](grpc::Status status) {
        completion->status = std::move(status);
        completion->done.store(true, std::memory_order_release);
        waiter->wake();
        completion->finished.store(true, std::memory_order_release);
    });
    session.wait([&] { return completion->done.load(std::memory_order_acquire); }, Clock::time_point::max());
    // The callback is at most inside wake(): the session (which the caller
    // keeps alive) must not go before it is out.
    while (!completion->finished.load(std::memory_order_acquire)) {
        std::this_thread::yield();
    }
    return std::move(completion->status);
}

}  // namespace dmabufd::detail
