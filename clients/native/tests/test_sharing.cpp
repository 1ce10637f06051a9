// Bytes seen by a second process: the fd passed on, and grants (by token,
// by uid, read-only, revoked) redeemed by another client process.
#include <unistd.h>

#include "dmabufd/dmabufd.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"
#include "support/pattern.hpp"
#include "support/process.hpp"

namespace {

bool has(const std::string& output, const std::string& text) { return output.find(text) != std::string::npos; }

void fill(dmabufd::Buffer& buffer, std::uint32_t seed) {
    dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Write);
    dmabufd_test::fill_pattern(mapping.data(), mapping.size(), seed);
}

}  // namespace

DMABUFD_TEST(sharing, a_second_process_reads_the_bytes_through_the_fd) {
    dmabufd::Client client = dmabufd_test::connect();
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        dmabufd::Buffer buffer = client.allocate(1 << 20, dmabufd_test::on_heap(heap.name, "shared"));
        fill(buffer, 5);
        const auto peer = dmabufd_test::run_peer({"verify-fd", std::to_string(buffer.size()), "5"}, buffer.fd());
        CHECK_MSG(peer.exit_code == 0, heap.name + ": " + peer.output);
        // The peer's probe found a dma-buf exactly where the heap makes one.
        CHECK_MSG(has(peer.output, heap.backend == dmabufd::Backend::Memfd ? "synced=0" : "synced=1"), peer.output);
    }
}

DMABUFD_TEST(sharing, a_token_grant_is_redeemed_by_another_client) {
    dmabufd::Client client = dmabufd_test::connect();
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        std::vector<dmabufd::Buffer> buffers = client.allocate_batch(256 << 10, 2, dmabufd_test::on_heap(heap.name));
        fill(buffers[0], 20);
        fill(buffers[1], 21);
        const dmabufd::GrantHandle grant = client.grant({buffers[0].id(), buffers[1].id()}, dmabufd::GrantTo::token());
        CHECK(grant.id > 0);
        CHECK(!grant.token.empty());
        bool listed = false;
        for (const dmabufd::GrantOffer& made : client.grants().made) {
            listed = listed || (made.id == grant.id && made.buffer_count == 2);
        }
        CHECK(listed);
        const auto peer = dmabufd_test::run_peer(
            {"redeem-token", dmabufd_test::runtime_dir(), grant.token, std::to_string(256 << 10), "20"});
        CHECK_MSG(peer.exit_code == 0, heap.name + ": " + peer.output);
        CHECK_MSG(has(peer.output, "buffers=2 read_only=0"), peer.output);
        CHECK_MSG(has(peer.output, "accmode=RDWR"), peer.output);
        CHECK_MSG(has(peer.output, heap.backend == dmabufd::Backend::Memfd ? "synced=0" : "synced=1"), peer.output);
        // One-time: a second redeem finds nothing.
        const auto again = dmabufd_test::run_peer({"redeem-error", dmabufd_test::runtime_dir(), grant.token});
        CHECK_MSG(again.exit_code == 0 && has(again.output, "status=NOT_FOUND"), again.output);
        // The buffers stay the granter's.
        CHECK_EQ(client.buffers().size(), std::size_t{2});
    }
}

DMABUFD_TEST(sharing, a_uid_grant_is_redeemed_by_id) {
    dmabufd::Client client = dmabufd_test::connect();
    dmabufd::Buffer buffer = client.allocate(64 << 10);
    fill(buffer, 33);
    const dmabufd::GrantHandle grant = client.grant({buffer.id()}, dmabufd::GrantTo::uid(::getuid()));
    CHECK(grant.token.empty());
    bool offered = false;
    for (const dmabufd::GrantOffer& offer : client.grants().offered) {
        offered = offered || (offer.id == grant.id && offer.from_pid == ::getpid());
    }
    CHECK_MSG(offered, "a grant to our own uid is offered to us");
    const auto peer = dmabufd_test::run_peer(
        {"redeem-grant", dmabufd_test::runtime_dir(), std::to_string(grant.id), std::to_string(64 << 10), "33"});
    CHECK_MSG(peer.exit_code == 0, peer.output);
    CHECK_MSG(has(peer.output, "buffers=1"), peer.output);
}

DMABUFD_TEST(sharing, a_revoked_grant_cannot_be_redeemed) {
    dmabufd::Client client = dmabufd_test::connect();
    dmabufd::Buffer buffer = client.allocate(4096);
    const dmabufd::GrantHandle grant = client.grant({buffer.id()}, dmabufd::GrantTo::token());
    client.revoke(grant.id);
    CHECK(client.grants().made.empty());
    const auto peer = dmabufd_test::run_peer({"redeem-error", dmabufd_test::runtime_dir(), grant.token});
    CHECK_MSG(peer.exit_code == 0 && has(peer.output, "status=NOT_FOUND"), peer.output);
    EXPECT_THROW(dmabufd::NotFound, client.revoke(grant.id));
}

DMABUFD_TEST(sharing, read_only_grants_are_enforced_on_memfds_only) {
    dmabufd::Client client = dmabufd_test::connect();
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        dmabufd::Buffer buffer = client.allocate(64 << 10, dmabufd_test::on_heap(heap.name));
        fill(buffer, 44);
        if (heap.backend != dmabufd::Backend::Memfd) {
            // Only a sealed memfd can be made read-only for everyone.
            const auto refused =
                EXPECT_THROW(dmabufd::NotEnforceable, client.grant({buffer.id()}, dmabufd::GrantTo::token(), true));
            CHECK_EQ(refused.reason(), std::string("NOT_ENFORCEABLE"));
            CHECK(refused.status() == dmabufd::StatusCode::FailedPrecondition);
            continue;
        }
        const dmabufd::GrantHandle grant = client.grant({buffer.id()}, dmabufd::GrantTo::token(), true);
        const auto peer = dmabufd_test::run_peer(
            {"redeem-token", dmabufd_test::runtime_dir(), grant.token, std::to_string(64 << 10), "44"});
        CHECK_MSG(peer.exit_code == 0, peer.output);
        CHECK_MSG(has(peer.output, "read_only=1"), peer.output);
        CHECK_MSG(has(peer.output, "accmode=RDONLY"), peer.output);
        CHECK_MSG(has(peer.output, "write_map=refused"), peer.output);
    }
}
