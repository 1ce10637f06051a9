// Allocate, single and batch, and Release: what the daemon books, and
// which fd is which buffer.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <set>

#include "dmabufd/dmabufd.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"

namespace {

// The fd is this buffer: same inode, close-on-exec, read-write.
void check_fd_is_buffer(const dmabufd::Buffer& buffer) {
    struct stat status {};
    CHECK(::fstat(buffer.fd(), &status) == 0);
    CHECK_EQ(static_cast<std::uint64_t>(status.st_ino), buffer.info().inode);
    CHECK((::fcntl(buffer.fd(), F_GETFD) & FD_CLOEXEC) != 0);
    CHECK_EQ(::fcntl(buffer.fd(), F_GETFL) & O_ACCMODE, O_RDWR);
}

void check_batch(dmabufd::Client& client, std::uint32_t count, const std::string& heap) {
    const int baseline = dmabufd_test::open_fd_count();
    {
        std::vector<dmabufd::Buffer> buffers = client.allocate_batch(4096, count, dmabufd_test::on_heap(heap, "batch"));
        CHECK_EQ(buffers.size(), std::size_t{count});
        std::set<std::uint64_t> ids;
        std::set<int> fds;
        for (const dmabufd::Buffer& buffer : buffers) {
            CHECK(ids.insert(buffer.id()).second);
            CHECK(fds.insert(buffer.fd()).second);
            CHECK(buffer.booked());
            CHECK_EQ(buffer.info().heap, heap);
            check_fd_is_buffer(buffer);
        }
        CHECK_EQ(dmabufd_test::open_fd_count(), baseline + static_cast<int>(count));
        CHECK_EQ(client.buffers().size(), std::size_t{count});
        // All in one call, the fds closed first.
        CHECK_EQ(client.release_all(std::move(buffers)), std::uint64_t{4096} * count);
        CHECK(client.buffers().empty());
    }
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
}

// At least `needed` fds of headroom; a test that cannot have it fails.
void ensure_fd_headroom(int needed) {
    rlimit limit{};
    CHECK(::getrlimit(RLIMIT_NOFILE, &limit) == 0);
    const rlim_t wanted = static_cast<rlim_t>(dmabufd_test::open_fd_count() + needed);
    if (limit.rlim_cur < wanted) {
        CHECK_MSG(limit.rlim_max >= wanted, "RLIMIT_NOFILE's hard limit is below " + std::to_string(wanted));
        limit.rlim_cur = wanted;
        CHECK(::setrlimit(RLIMIT_NOFILE, &limit) == 0);
    }
}

}  // namespace

DMABUFD_TEST(allocate, one_buffer_per_heap) {
    dmabufd::Client client = dmabufd_test::connect();
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        dmabufd::Buffer buffer = client.allocate(64 << 10, dmabufd_test::on_heap(heap.name, "single"));
        const dmabufd::BufferInfo& info = buffer.info();
        CHECK_EQ(info.heap, heap.name);
        CHECK(info.backend == heap.backend);
        CHECK(info.size >= std::uint64_t{64 << 10});
        CHECK_EQ(info.kernel_name, std::to_string(::getpid()) + ":single");
        CHECK_EQ(buffer.is_dma_buf(), heap.name != "memfd");
        CHECK(!buffer.read_only());
        check_fd_is_buffer(buffer);
        const dmabufd::BufferInfo described = client.describe(buffer.id());
        CHECK_EQ(described.id, info.id);
        CHECK_EQ(described.inode, info.inode);
        CHECK_EQ(described.heap, heap.name);
        const auto listed = client.buffers();
        CHECK_EQ(listed.size(), std::size_t{1});
        CHECK_EQ(listed[0].id, info.id);
    }
}

DMABUFD_TEST(allocate, a_batch_of_300_spans_two_frames) {
    dmabufd::Client client = dmabufd_test::connect();
    ensure_fd_headroom(400);
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        check_batch(client, 300, heap.name);
    }
}

DMABUFD_TEST(allocate, the_largest_batch_spans_five_frames) {
    dmabufd::Client client = dmabufd_test::connect();
    ensure_fd_headroom(DBFD_DEFAULT_MAX_BATCH + 100);
    check_batch(client, DBFD_DEFAULT_MAX_BATCH, dmabufd_test::heaps_under_test(client).front().name);
}

DMABUFD_TEST(allocate, release_takes_buffers_off_the_books) {
    dmabufd::Client client = dmabufd_test::connect();
    const int baseline = dmabufd_test::open_fd_count();
    std::vector<dmabufd::Buffer> buffers = client.allocate_batch(8192, 4);
    CHECK_EQ(client.release({buffers[0].id(), buffers[1].id()}), std::uint64_t{2 * 8192});
    CHECK_EQ(client.buffers().size(), std::size_t{2});
    // Released ids are unknown now: all or nothing, nothing released.
    const auto unknown = EXPECT_THROW(dmabufd::BufferNotFound, client.release({buffers[0].id(), buffers[2].id()}));
    CHECK_EQ(unknown.reason(), std::string("BUFFER_NOT_FOUND"));
    CHECK_EQ(client.buffers().size(), std::size_t{2});
    // Buffer::release(): the fd first, then the booking.
    buffers[2].release();
    CHECK(buffers[2].fd() < 0);
    CHECK(!buffers[2].booked());
    CHECK_EQ(client.buffers().size(), std::size_t{1});
    // A Buffer going out of scope releases itself.
    buffers.clear();
    CHECK(client.buffers().empty());
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
}

DMABUFD_TEST(allocate, buffers_outlive_their_client) {
    std::vector<dmabufd::Buffer> kept;
    {
        dmabufd::Client client = dmabufd_test::connect();
        kept = client.allocate_batch(4096, 2);
    }
    // The session is over (it released them); the fds are still ours.
    for (dmabufd::Buffer& buffer : kept) {
        check_fd_is_buffer(buffer);
        dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Write);
        mapping.data()[0] = 1;
    }
    kept.clear();  // no client to release through: nothing to do, nothing thrown
}

DMABUFD_TEST(allocate, move_assignment_lets_go_of_the_old_buffer) {
    dmabufd::Client client = dmabufd_test::connect();
    const int baseline = dmabufd_test::open_fd_count();
    dmabufd::Buffer kept = client.allocate(4096);
    dmabufd::Buffer incoming = client.allocate(8192);
    const std::uint64_t incoming_id = incoming.id();
    kept = std::move(incoming);
    CHECK_EQ(kept.id(), incoming_id);
    CHECK(kept.booked());
    CHECK(!incoming.booked());
    CHECK(incoming.fd() < 0);
    // The old buffer's fd is closed and its booking released.
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline + 1);
    const auto listed = client.buffers();
    CHECK_EQ(listed.size(), std::size_t{1});
    CHECK_EQ(listed[0].id, incoming_id);
}
