// MSG_CTRUNC for real: with RLIMIT_NOFILE lowered, the kernel installs
// the fds it can and drops the rest of the frame's. The call fails
// FdsLost, the fds that did arrive are closed, what the call booked is
// released, and the session goes on.
#include <sys/resource.h>

#include <type_traits>

#include "dmabufd/dmabufd.hpp"
#include "support/daemon_env.hpp"
#include "support/harness.hpp"

namespace {

// Lowers the soft RLIMIT_NOFILE while it lives.
class FdLimit {
public:
    explicit FdLimit(int headroom) {
        CHECK(::getrlimit(RLIMIT_NOFILE, &saved_) == 0);
        rlimit lowered = saved_;
        lowered.rlim_cur = static_cast<rlim_t>(dmabufd_test::open_fd_count() + headroom);
        CHECK(::setrlimit(RLIMIT_NOFILE, &lowered) == 0);
    }
    ~FdLimit() { ::setrlimit(RLIMIT_NOFILE, &saved_); }
    FdLimit(const FdLimit&) = delete;
    FdLimit& operator=(const FdLimit&) = delete;

private:
    rlimit saved_{};
};

// Allocates `count` with only `headroom` fds free and checks the recovery.
void check_recovery(std::uint32_t count, int headroom) {
    dmabufd::Client client = dmabufd_test::connect();
    client.allocate(4096).release();  // gRPC's own fds are all open before the limit drops
    const int baseline = dmabufd_test::open_fd_count();
    {
        FdLimit limit(headroom);
        const auto error = EXPECT_THROW(dmabufd::FdsLost, client.allocate_batch(4096, count));
        CHECK(error.status() == dmabufd::StatusCode::ResourceExhausted);
        static_assert(std::is_base_of_v<dmabufd::ResourceExhausted, dmabufd::FdsLost>);
    }
    // Every fd that arrived was closed, and the daemon holds nothing for us.
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
    CHECK(client.buffers().empty());
    CHECK(!client.session().ended());
    // The session goes on: frames of the lost call that came later were
    // closed on arrival, and a new call gets all its fds.
    std::vector<dmabufd::Buffer> after = client.allocate_batch(4096, count);
    CHECK_EQ(after.size(), std::size_t{count});
    after.clear();
    CHECK_EQ(dmabufd_test::open_fd_count(), baseline);
}

}  // namespace

DMABUFD_TEST(ctrunc, a_frame_cut_short_loses_the_call_not_the_session) {
    check_recovery(100, 40);
}

DMABUFD_TEST(ctrunc, a_later_frame_cut_short_closes_the_earlier_ones) {
    // 300 fds come in frames of 253 and 47: the first fits, the second
    // is cut, so the 253 already filed must be closed too.
    check_recovery(300, 280);
}
