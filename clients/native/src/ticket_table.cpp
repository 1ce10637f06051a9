#include "ticket_table.hpp"

#include <utility>

namespace dmabufd::detail {

namespace {

// More fds than any call can deliver (heaps.max_batch and a grant's
// buffers are at most a few thousand): a bigger total is garbage, and
// must not make us allocate gigabytes of slots.
constexpr std::uint32_t kMaxTotal = 1u << 20;

void move_all(std::vector<UniqueFd>& from, std::vector<UniqueFd>& to) {
    for (UniqueFd& fd : from) {
        to.push_back(std::move(fd));
    }
    from.clear();
}

void discard_slots(std::vector<DeliveredFd>& slots, std::vector<UniqueFd>& discard) {
    for (DeliveredFd& slot : slots) {
        if (slot.fd) {
            discard.push_back(std::move(slot.fd));
        }
    }
    slots.clear();
}

}  // namespace

void TicketTable::expect(const Ticket& ticket) { deliveries_.try_emplace(ticket); }

TicketTable::Filed TicketTable::file(const FdsFrame& frame, std::vector<UniqueFd>& fds,
                                     std::vector<UniqueFd>& discard) {
    const auto found = deliveries_.find(frame.ticket);
    if (found == deliveries_.end()) {
        move_all(fds, discard);
        return Filed::NotExpected;
    }
    Delivery& delivery = found->second;
    if (delivery.lost) {
        move_all(fds, discard);
        return Filed::Yes;
    }
    if (!delivery.sized) {
        if (frame.total > kMaxTotal) {
            move_all(fds, discard);
            return Filed::Inconsistent;
        }
        delivery.sized = true;
        delivery.total = frame.total;
        delivery.slots.resize(frame.total);
    }
    if (frame.total != delivery.total) {
        move_all(fds, discard);
        return Filed::Inconsistent;
    }
    for (std::size_t i = 0; i < frame.buffer_ids.size(); ++i) {
        if (delivery.slots[frame.first_index + i].fd) {
            move_all(fds, discard);
            return Filed::Inconsistent;  // the same index twice
        }
    }
    for (std::size_t i = 0; i < frame.buffer_ids.size(); ++i) {
        DeliveredFd& slot = delivery.slots[frame.first_index + i];
        slot.buffer_id = frame.buffer_ids[i];
        slot.fd = std::move(fds[i]);
    }
    fds.clear();
    delivery.filed += frame.buffer_ids.size();
    return Filed::Yes;
}

void TicketTable::mark_lost(const Ticket& ticket, std::vector<UniqueFd>& discard) {
    const auto found = deliveries_.find(ticket);
    if (found == deliveries_.end()) {
        return;
    }
    found->second.lost = true;
    discard_slots(found->second.slots, discard);
    found->second.filed = 0;
}

TicketTable::State TicketTable::state(const Ticket& ticket) const {
    State state;
    const auto found = deliveries_.find(ticket);
    if (found == deliveries_.end()) {
        return state;
    }
    const Delivery& delivery = found->second;
    state.expected = true;
    state.lost = delivery.lost;
    state.complete = delivery.sized && !delivery.lost && delivery.filed == delivery.total;
    state.total = delivery.total;
    return state;
}

std::vector<DeliveredFd> TicketTable::take(const Ticket& ticket) {
    std::vector<DeliveredFd> taken;
    const auto found = deliveries_.find(ticket);
    if (found != deliveries_.end()) {
        taken = std::move(found->second.slots);
        deliveries_.erase(found);
    }
    return taken;
}

void TicketTable::forget(const Ticket& ticket, std::vector<UniqueFd>& discard) {
    const auto found = deliveries_.find(ticket);
    if (found != deliveries_.end()) {
        discard_slots(found->second.slots, discard);
        deliveries_.erase(found);
    }
}

void TicketTable::clear(std::vector<UniqueFd>& discard) {
    for (auto& entry : deliveries_) {
        discard_slots(entry.second.slots, discard);
    }
    deliveries_.clear();
}

}  // namespace dmabufd::detail
