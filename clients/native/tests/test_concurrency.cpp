// Several threads on one session: every call gets exactly its own fds,
// whatever order the frames of concurrent calls arrive in.
#include <sys/resource.h>
#include <sys/stat.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>

#include "dmabufd/dmabufd.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"
#include "support/pattern.hpp"

namespace {

bool fd_matches(const dmabufd::Buffer& buffer) {
    struct stat status {};
    return ::fstat(buffer.fd(), &status) == 0 && static_cast<std::uint64_t>(status.st_ino) == buffer.info().inode;
}

void run_threads(dmabufd::Client& client, int threads, const std::function<void(int)>& body) {
    std::atomic<int> failures{0};
    std::mutex messages_mutex;  // guards `messages`
    std::vector<std::string> messages;
    std::vector<std::thread> running;
    for (int thread = 0; thread < threads; ++thread) {
        running.emplace_back([&, thread] {
            try {
                body(thread);
            } catch (const dmabufd_test::Failure& failure) {
                ++failures;
                std::lock_guard<std::mutex> lock(messages_mutex);
                messages.push_back(failure.message);
            } catch (const std::exception& error) {
                ++failures;
                std::lock_guard<std::mutex> lock(messages_mutex);
                messages.push_back(error.what());
            }
        });
    }
    for (std::thread& thread : running) {
        thread.join();
    }
    CHECK_MSG(failures.load() == 0, messages.empty() ? "" : messages.front());
    CHECK(!client.session().ended());
}

}  // namespace

DMABUFD_TEST(concurrency, threads_share_one_session) {
    for (const dmabufd::ReaderMode mode : {dmabufd::ReaderMode::OwnThread, dmabufd::ReaderMode::External}) {
        dmabufd::Client client = dmabufd_test::connect(mode);
        const auto heaps = dmabufd_test::heaps_under_test(client);
        const int baseline = dmabufd_test::open_fd_count();
        std::mutex ids_mutex;  // guards `ids`
        std::set<std::uint64_t> ids;
        run_threads(client, 8, [&](int thread) {
            for (int round = 0; round < 12; ++round) {
                const std::string& heap = heaps[static_cast<std::size_t>(thread + round) % heaps.size()].name;
                std::vector<dmabufd::Buffer> buffers =
                    client.allocate_batch(16 << 10, 3, dmabufd_test::on_heap(heap, "threads"));
                for (std::size_t i = 0; i < buffers.size(); ++i) {
                    CHECK(fd_matches(buffers[i]));
                    const auto seed = static_cast<std::uint32_t>(thread * 1000 + round * 10 + static_cast<int>(i));
                    dmabufd::Mapping mapping = buffers[i].map(dmabufd::Access::ReadWrite);
                    dmabufd_test::fill_pattern(mapping.data(), mapping.size(), seed);
                    CHECK_EQ(dmabufd_test::first_mismatch(mapping.data(), mapping.size(), seed), mapping.size());
                    std::lock_guard<std::mutex> lock(ids_mutex);
                    CHECK(ids.insert(buffers[i].id()).second);
                }
                CHECK_EQ(client.describe(buffers[0].id()).id, buffers[0].id());
                client.release_all(std::move(buffers));
            }
        });
        CHECK_EQ(ids.size(), std::size_t{8 * 12 * 3});
        CHECK(client.buffers().empty());
        CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
    }
}

DMABUFD_TEST(concurrency, large_deliveries_interleave) {
    // Four calls of 300 fds at once: eight frames of four tickets, read
    // by one reader in whatever order the daemon wrote them.
    dmabufd::Client client = dmabufd_test::connect();
    rlimit limit{};
    CHECK(::getrlimit(RLIMIT_NOFILE, &limit) == 0);
    CHECK_MSG(limit.rlim_cur >= static_cast<rlim_t>(dmabufd_test::open_fd_count() + 1300) ||
                  limit.rlim_max >= static_cast<rlim_t>(dmabufd_test::open_fd_count() + 1300),
              "RLIMIT_NOFILE too low for 1200 fds");
    if (limit.rlim_cur < static_cast<rlim_t>(dmabufd_test::open_fd_count() + 1300)) {
        limit.rlim_cur = static_cast<rlim_t>(dmabufd_test::open_fd_count() + 1300);
        CHECK(::setrlimit(RLIMIT_NOFILE, &limit) == 0);
    }
    run_threads(client, 4, [&](int) {
        for (int round = 0; round < 3; ++round) {
            std::vector<dmabufd::Buffer> buffers = client.allocate_batch(4096, 300);
            CHECK_EQ(buffers.size(), std::size_t{300});
            for (const dmabufd::Buffer& buffer : buffers) {
                CHECK(fd_matches(buffer));
            }
            client.release_all(std::move(buffers));
        }
    });
    CHECK(client.buffers().empty());
}
