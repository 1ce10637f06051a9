// Mapping with DMA_BUF_IOCTL_SYNC: on real dma-bufs (system, udmabuf: in
// the VM) the ioctl brackets every access; on memfds it is refused with
// ENOTTY, which the mapping handles.
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <string>

#include "dmabufd/dmabufd.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"
#include "support/pattern.hpp"

namespace {

// The fdinfo line `key:` of one of our fds, trimmed.
std::string fdinfo_field(int fd, const std::string& key) {
    std::ifstream info("/proc/self/fdinfo/" + std::to_string(fd));
    std::string line;
    while (std::getline(info, line)) {
        if (line.rfind(key + ":", 0) == 0) {
            const std::size_t start = line.find_first_not_of(" \t", key.size() + 1);
            return start == std::string::npos ? "" : line.substr(start);
        }
    }
    return "";
}

}  // namespace

DMABUFD_TEST(mapping, write_then_read_with_sync_on_every_heap) {
    dmabufd::Client client = dmabufd_test::connect();
    std::uint32_t seed = 1;
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        const bool dma_buf = heap.backend != dmabufd::Backend::Memfd;
        CHECK_EQ(heap.cpu_sync_required, dma_buf);
        dmabufd::Buffer buffer = client.allocate(1 << 20, dmabufd_test::on_heap(heap.name, "mapped"));
        {
            dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Write);
            CHECK_EQ(mapping.synced(), dma_buf);
            CHECK_EQ(mapping.size(), static_cast<std::size_t>(buffer.size()));
            dmabufd_test::fill_pattern(mapping.data(), mapping.size(), seed);
            mapping.end();  // SYNC_END now, reporting its error
            CHECK(!mapping.mapped());
            CHECK(!mapping.synced());
        }
        {
            const dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Read);
            CHECK_EQ(mapping.synced(), dma_buf);
            CHECK_EQ(dmabufd_test::first_mismatch(mapping.data(), mapping.size(), seed), mapping.size());
        }
        if (dma_buf) {
            // The kernel says it is a dma-buf of that exporter, named by us.
            CHECK_EQ(fdinfo_field(buffer.fd(), "exp_name"), heap.name);
            CHECK_EQ(fdinfo_field(buffer.fd(), "name"), std::to_string(::getpid()) + ":mapped");
            CHECK_EQ(dmabufd::sync_dma_buf(buffer.fd(), dmabufd::Access::ReadWrite, false), 0);
            CHECK_EQ(dmabufd::sync_dma_buf(buffer.fd(), dmabufd::Access::ReadWrite, true), 0);
        }
        ++seed;
    }
}

DMABUFD_TEST(mapping, memfd_buffers_refuse_the_sync_ioctl) {
    dmabufd::Client client = dmabufd_test::connect();
    dmabufd::Buffer buffer = client.allocate(64 << 10, dmabufd_test::on_heap("memfd"));
    CHECK(!buffer.is_dma_buf());
    // The ioctl itself, issued for real on the memfd: ENOTTY.
    CHECK_EQ(dmabufd::sync_dma_buf(buffer.fd(), dmabufd::Access::Read, false), ENOTTY);
    // Probe takes ENOTTY as "not a dma-buf", Required as an error.
    {
        dmabufd::Mapping probed(buffer.fd(), 64 << 10, dmabufd::Access::ReadWrite, dmabufd::CpuSync::Probe);
        CHECK(!probed.synced());
        dmabufd_test::fill_pattern(probed.data(), probed.size(), 77);
    }
    const auto refused = EXPECT_THROW(
        dmabufd::SystemError,
        dmabufd::Mapping(buffer.fd(), 64 << 10, dmabufd::Access::Read, dmabufd::CpuSync::Required));
    CHECK_EQ(refused.error_number(), ENOTTY);
    // Buffer::map knows from the backend and does not ask.
    const dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Read);
    CHECK(!mapping.synced());
    CHECK_EQ(dmabufd_test::first_mismatch(mapping.data(), mapping.size(), 77), mapping.size());
}

DMABUFD_TEST(mapping, dma_bufs_answer_the_probe) {
    dmabufd::Client client = dmabufd_test::connect();
    for (const dmabufd::HeapInfo& heap : dmabufd_test::heaps_under_test(client)) {
        dmabufd::Buffer buffer = client.allocate(4096, dmabufd_test::on_heap(heap.name));
        const dmabufd::Mapping probed(buffer.fd(), 4096, dmabufd::Access::Read, dmabufd::CpuSync::Probe);
        CHECK_EQ(probed.synced(), heap.backend != dmabufd::Backend::Memfd);
    }
}

DMABUFD_TEST(mapping, moves_keep_one_owner) {
    dmabufd::Client client = dmabufd_test::connect();
    dmabufd::Buffer buffer = client.allocate(8192);
    dmabufd::Mapping first = buffer.map(dmabufd::Access::ReadWrite);
    first.data()[0] = 42;
    dmabufd::Mapping second = std::move(first);
    CHECK(!first.mapped());
    CHECK(second.mapped());
    CHECK_EQ(int{second.data()[0]}, 42);
    second.end();
    second.end();  // a second end() does nothing
    CHECK(!second.mapped());
    EXPECT_THROW(dmabufd::InvalidArgument, dmabufd::Mapping(buffer.fd(), 0, dmabufd::Access::Read));
}
