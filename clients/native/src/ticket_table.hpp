// The fds the reader filed, by the ticket of the call they are for
// (fd-protocol.md 5.2). Not thread-safe: the session's lock guards it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "dmabufd/session.hpp"
#include "dmabufd/ticket.hpp"
#include "dmabufd/unique_fd.hpp"
#include "frame_codec.hpp"

namespace dmabufd::detail {

class TicketTable {
public:
    enum class Filed {
        Yes,
        NotExpected,   // no call waits for this ticket (it failed, or was never ours): fds go to `discard`
        Inconsistent,  // the frame contradicts earlier ones of its ticket: a daemon bug
    };

    struct State {
        bool expected = false;
        bool lost = false;      // MSG_CTRUNC took some of the call's fds
        bool complete = false;  // every fd of the call is filed
        std::uint32_t total = 0;
    };

    // A call is about to name `ticket`: keep its frames.
    void expect(const Ticket& ticket);
    // Files `frame`'s (id, fd) pairs at their index. Fds that are not kept
    // are moved to `discard`, for the caller to close outside its lock.
    Filed file(const FdsFrame& frame, std::vector<UniqueFd>& fds, std::vector<UniqueFd>& discard);
    // MSG_CTRUNC hit a frame of `ticket`: drop what was filed, and all that comes later.
    void mark_lost(const Ticket& ticket, std::vector<UniqueFd>& discard);
    State state(const Ticket& ticket) const;
    // The call's fds in delivery order; the ticket is forgotten.
    std::vector<DeliveredFd> take(const Ticket& ticket);
    void forget(const Ticket& ticket, std::vector<UniqueFd>& discard);
    void clear(std::vector<UniqueFd>& discard);

private:
    struct Delivery {
        bool lost = false;
        bool sized = false;  // a first frame set total and the slots
        std::uint32_t total = 0;
        std::size_t filed = 0;
        std::vector<DeliveredFd> slots;  // slot i is filled when its fd is valid
    };

    std::unordered_map<Ticket, Delivery, TicketHash> deliveries_;
};

}  // namespace dmabufd::detail
