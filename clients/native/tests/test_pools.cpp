// Image pools: layouts, frames, release together, recycling, and a pool
// granted to another client process.
#include <set>

#include "dmabufd/dmabufd.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"
#include "support/pattern.hpp"
#include "support/process.hpp"

namespace {

dmabufd::PoolRequest pool_request(const std::string& fourcc, const std::string& heap, std::uint32_t count = 4) {
    dmabufd::PoolRequest request;
    request.format.fourcc = fourcc;
    request.format.width = 640;
    request.format.height = 480;
    request.count = count;
    request.heap = heap;
    request.name = "pool";
    return request;
}

}  // namespace

DMABUFD_TEST(pools, nv12_frames_hold_both_planes) {
    dmabufd::Client client = dmabufd_test::connect();
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        dmabufd::Pool pool = client.allocate_pool(pool_request("NV12", heap.name));
        CHECK(pool.id() > 0);
        CHECK(pool.booked());
        CHECK_EQ(pool.format().fourcc, std::string("NV12"));
        CHECK_EQ(pool.frame_count(), std::size_t{4});
        CHECK_EQ(pool.buffers_per_frame(), std::size_t{1});
        CHECK_EQ(pool.frame_bytes(), std::uint64_t{640 * 480 * 3 / 2});
        const auto& planes = pool.planes();
        CHECK_EQ(planes.size(), std::size_t{2});
        CHECK_EQ(planes[0].offset, std::uint64_t{0});
        CHECK_EQ(planes[0].stride, 640u);
        CHECK_EQ(planes[0].size, std::uint64_t{640 * 480});
        CHECK_EQ(planes[1].buffer_index, 0u);
        CHECK_EQ(planes[1].offset, std::uint64_t{640 * 480});
        CHECK_EQ(planes[1].size, std::uint64_t{640 * 240});
        for (std::size_t frame = 0; frame < pool.frame_count(); ++frame) {
            const dmabufd::Buffer& buffer = pool.frame_buffer(frame);
            CHECK(buffer.size() >= pool.frame_bytes());
            CHECK_EQ(buffer.info().heap, heap.name);
            CHECK(!buffer.booked());  // booked to the pool, released with it
            dmabufd::Mapping mapping = buffer.map(dmabufd::Access::ReadWrite);
            CHECK_EQ(mapping.synced(), heap.backend != dmabufd::Backend::Memfd);
        }
        EXPECT_THROW(dmabufd::OutOfRange, pool.frame_buffer(4));
        CHECK_EQ(client.buffers().size(), std::size_t{4});
        // One buffer of a pool cannot go alone.
        const auto busy = EXPECT_THROW(dmabufd::BufferBusy, client.release({pool.frame_buffer(0).id()}));
        CHECK_EQ(busy.reason(), std::string("BUFFER_BUSY"));
        pool.release();
        CHECK(!pool.booked());
        CHECK(pool.buffers().empty());
        CHECK(client.buffers().empty());
    }
}

DMABUFD_TEST(pools, multi_planar_formats_get_a_buffer_per_plane) {
    dmabufd::Client client = dmabufd_test::connect();
    dmabufd::Pool pool = client.allocate_pool(pool_request("NM12", dmabufd_test::heaps_under_test(client).front().name));
    CHECK_EQ(pool.buffers_per_frame(), std::size_t{2});
    CHECK_EQ(pool.buffers().size(), std::size_t{8});
    CHECK_EQ(pool.planes()[0].buffer_index, 0u);
    CHECK_EQ(pool.planes()[1].buffer_index, 1u);
    CHECK_EQ(pool.planes()[1].offset, std::uint64_t{0});
    CHECK(pool.frame_buffer(2, 0).size() >= pool.planes()[0].size);
    CHECK(pool.frame_buffer(2, 1).size() >= pool.planes()[1].size);
    CHECK(pool.frame_buffer(2, 0).id() != pool.frame_buffer(2, 1).id());
}

DMABUFD_TEST(pools, a_destroyed_pool_is_released_and_recycled) {
    dmabufd::Client client = dmabufd_test::connect();
    const std::string heap = dmabufd_test::heaps_under_test(client).front().name;
    dmabufd::PoolRequest request = pool_request("YUYV", heap, 3);
    request.recycle = true;
    std::uint64_t first_id = 0;
    std::set<std::uint64_t> first_inodes;
    {
        dmabufd::Pool pool = client.allocate_pool(request);
        first_id = pool.id();
        for (const dmabufd::Buffer& buffer : pool.buffers()) {
            first_inodes.insert(buffer.info().inode);
        }
        CHECK_EQ(client.buffers().size(), std::size_t{3});
    }
    CHECK(client.buffers().empty());
    dmabufd::Pool again = client.allocate_pool(request);
    CHECK(again.id() != first_id);
    CHECK_MSG(again.recycled(), "a pool of the same format after a recycled release comes warm");
    // Warm means the very same memory.
    std::set<std::uint64_t> inodes;
    for (const dmabufd::Buffer& buffer : again.buffers()) {
        inodes.insert(buffer.info().inode);
    }
    CHECK(inodes == first_inodes);
}

DMABUFD_TEST(pools, a_pool_granted_to_another_client) {
    dmabufd::Client client = dmabufd_test::connect();
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        dmabufd::Pool pool = client.allocate_pool(pool_request("NV12", heap.name, 3));
        for (std::size_t i = 0; i < pool.buffers().size(); ++i) {
            dmabufd::Mapping mapping = pool.buffers()[i].map(dmabufd::Access::Write);
            dmabufd_test::fill_pattern(mapping.data(), mapping.size(), 60 + static_cast<std::uint32_t>(i));
        }
        const dmabufd::GrantHandle grant = client.grant_pool(pool.id(), dmabufd::GrantTo::token());
        const auto peer = dmabufd_test::run_peer({"redeem-pool", dmabufd_test::runtime_dir(), grant.token, "60"});
        CHECK_MSG(peer.exit_code == 0, heap.name + ": " + peer.output);
        CHECK_MSG(peer.output.find("pool id=" + std::to_string(pool.id()) +
                                   " frames=3 per_frame=1 planes=2 fourcc=NV12 booked=0") != std::string::npos,
                  peer.output);
    }
}
