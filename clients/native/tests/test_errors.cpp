// Typed errors: the status class, the rich error's reason, and for quota
// denials its metadata and QuotaFailure.
#include <unistd.h>

#include <algorithm>
#include <type_traits>
#include <typeinfo>

#include "dmabufd/dmabufd.hpp"
#include "rpc_error.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"
#include "support/raw_rpc.hpp"

DMABUFD_TEST(errors, an_unknown_heap_is_heap_not_found) {
    dmabufd::Client client = dmabufd_test::connect();
    const auto error = EXPECT_THROW(dmabufd::HeapNotFound, client.allocate(4096, dmabufd_test::on_heap("no-such-heap")));
    CHECK(error.status() == dmabufd::StatusCode::NotFound);
    CHECK_EQ(error.reason(), std::string("HEAP_NOT_FOUND"));
    CHECK(std::string(error.what()).find("no-such-heap") != std::string::npos);
    static_assert(std::is_base_of_v<dmabufd::NotFound, dmabufd::HeapNotFound>);
    CHECK(client.buffers().empty());
}

DMABUFD_TEST(errors, size_zero_is_invalid_argument) {
    dmabufd::Client client = dmabufd_test::connect();
    const auto error = EXPECT_THROW(dmabufd::InvalidArgument, client.allocate(0));
    CHECK(error.status() == dmabufd::StatusCode::InvalidArgument);
    CHECK_EQ(error.reason(), std::string("INVALID_REQUEST"));
    // Refused before anything is sent: the daemon would take count 0 as 1.
    const auto local = EXPECT_THROW(dmabufd::InvalidArgument, client.allocate_batch(4096, 0));
    CHECK(local.reason().empty());
}

DMABUFD_TEST(errors, a_quota_denial_is_quota_exceeded_with_its_details) {
    dmabufd::Client client = dmabufd_test::connect();
    dmabufd::Buffer held = client.allocate(64 << 10);
    const dmabufd::SessionStats stats = client.stats();
    CHECK(stats.quota_bytes > 0);
    CHECK(stats.charged_bytes >= held.size());
    // More than the whole quota, whatever else the uid holds meanwhile.
    const std::uint64_t over = stats.quota_bytes + 4096;
    // The heap with the largest buffers (udmabuf's are capped small).
    const auto heaps = dmabufd_test::heaps_under_test(client);
    const dmabufd::HeapInfo heap = *std::max_element(
        heaps.begin(), heaps.end(), [](const auto& a, const auto& b) { return a.max_buffer_bytes < b.max_buffer_bytes; });
    CHECK_MSG(over <= heap.max_buffer_bytes,
              "the daemon's quota (" + std::to_string(stats.quota_bytes) + " bytes) is above the largest buffer of " +
                  heap.name + ": start it with a smaller [quota.default] max_bytes (the test drivers use 256M)");
    const auto error = EXPECT_THROW(dmabufd::QuotaExceeded, client.allocate(over, dmabufd_test::on_heap(heap.name)));
    CHECK(error.status() == dmabufd::StatusCode::ResourceExhausted);
    static_assert(std::is_base_of_v<dmabufd::ResourceExhausted, dmabufd::QuotaExceeded>);
    CHECK_EQ(error.reason(), std::string("QUOTA_EXCEEDED"));
    CHECK_EQ(error.metadata().count("uid"), std::size_t{1});
    CHECK_EQ(error.metadata().at("uid"), std::to_string(::getuid()));
    CHECK_EQ(error.quota_violations().size(), std::size_t{1});
    CHECK_EQ(error.quota_violations()[0].subject, "uid:" + std::to_string(::getuid()));
    CHECK(error.quota_violations()[0].description.find("quota") != std::string::npos);
    // Nothing was booked by the refused call.
    CHECK_EQ(client.buffers().size(), std::size_t{1});
}

DMABUFD_TEST(errors, unknown_ids_are_buffer_not_found) {
    dmabufd::Client client = dmabufd_test::connect();
    const auto error = EXPECT_THROW(dmabufd::BufferNotFound, client.describe(~std::uint64_t{0} >> 1));
    CHECK_EQ(error.reason(), std::string("BUFFER_NOT_FOUND"));
    EXPECT_THROW(dmabufd::NotFound, client.release_pool(~std::uint64_t{0} >> 1));
}

DMABUFD_TEST(errors, a_call_without_a_session_is_session_invalid) {
    auto stub = dmabufd_test::raw_stub();
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    dmabufd::v1::AllocateRequest request;
    request.set_size(4096);
    dmabufd::v1::AllocateResponse response;
    const grpc::Status status = stub->Allocate(&context, request, &response);
    CHECK(status.error_code() == grpc::StatusCode::UNAUTHENTICATED);
    CHECK(!status.error_details().empty());
    const auto error = EXPECT_THROW(dmabufd::SessionInvalid, dmabufd::detail::throw_rpc_error(status));
    CHECK_EQ(error.reason(), std::string("SESSION_INVALID"));
    // The same trailer under another status is not trusted.
    const dmabufd::ErrorDetails mismatched =
        dmabufd::detail::decode_rich_details(status.error_details(), dmabufd::StatusCode::NotFound);
    CHECK(mismatched.reason.empty());
    // A reason that does not go with the status does not pick the class.
    dmabufd::ErrorDetails foreign_reason;
    foreign_reason.reason = "QUOTA_EXCEEDED";
    try {
        dmabufd::throw_status_error(dmabufd::StatusCode::Unavailable, "x", foreign_reason);
    } catch (const dmabufd::Error& kept) {
        CHECK(typeid(kept) == typeid(dmabufd::Unavailable));
        CHECK_EQ(kept.reason(), std::string("QUOTA_EXCEEDED"));
    }
}

DMABUFD_TEST(errors, a_ticket_sent_on_another_session_is_refused) {
    dmabufd::Client owner = dmabufd_test::connect();
    dmabufd::Client other = dmabufd_test::connect();
    const dmabufd::Ticket ticket = other.session().send_ticket();
    // A call of `other` after it: once answered, the daemon has read the
    // ticket too (frames of one socket are read in order).
    other.buffers();
    auto stub = dmabufd_test::raw_stub();
    grpc::ClientContext context;
    dmabufd_test::name_session(context, owner.session(), ticket);
    dmabufd::v1::ListBuffersResponse response;
    const grpc::Status status = stub->ListBuffers(&context, dmabufd::v1::ListBuffersRequest(), &response);
    other.session().forget(ticket);
    const auto error = EXPECT_THROW(dmabufd::PermissionDenied, dmabufd::detail::throw_rpc_error(status));
    CHECK(error.status() == dmabufd::StatusCode::PermissionDenied);
}
