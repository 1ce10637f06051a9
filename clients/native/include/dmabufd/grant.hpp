// Grants: sharing buffers with another client (docs/pools-and-grants.md).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dmabufd/buffer.hpp"
#include "dmabufd/pool.hpp"

namespace dmabufd {

// Who may redeem a grant: whoever holds a one-time token, or any session of a uid.
class GrantTo {
public:
    static GrantTo token() { return GrantTo(std::nullopt); }
    static GrantTo uid(std::uint32_t uid) { return GrantTo(uid); }
    const std::optional<std::uint32_t>& to_uid() const noexcept { return uid_; }

private:
    explicit GrantTo(std::optional<std::uint32_t> uid) : uid_(uid) {}
    std::optional<std::uint32_t> uid_;
};

struct GrantHandle {
    std::uint64_t id = 0;
    std::string token;  // hex; token grants only: hand it to the receiver
};

struct GrantOffer {
    std::uint64_t id = 0;
    std::uint32_t from_uid = 0;
    std::int32_t from_pid = 0;
    std::uint32_t buffer_count = 0;
    std::uint64_t bytes = 0;
    bool read_only = false;
    std::uint64_t pool_id = 0;  // 0: buffers, not a pool
};

struct GrantList {
    std::vector<GrantOffer> offered;  // made to this uid, not redeemed yet
    std::vector<GrantOffer> made;     // made by this session, not revoked
};

// What a Redeem delivered: this process's own fds of buffers that stay
// booked to the grant's owner (closing them releases nothing).
struct Redeemed {
    std::uint64_t grant_id = 0;
    bool read_only = false;       // O_RDONLY fds of sealed memfds
    std::vector<Buffer> buffers;  // a grant of buffers
    std::optional<Pool> pool;     // a grant of a pool: its buffers are in it
};

}  // namespace dmabufd
