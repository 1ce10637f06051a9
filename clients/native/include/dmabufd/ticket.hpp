// Tickets, tokens and their hex form (fd-protocol.md 3.1).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "dmabufd/fd_protocol.h"

namespace dmabufd {

using Ticket = std::array<std::uint8_t, DBFD_TICKET_BYTES>;
using SessionToken = std::array<std::uint8_t, DBFD_TOKEN_BYTES>;

// 16 bytes from getrandom(): a fresh ticket, never reused.
Ticket random_ticket();

// Lower-case hex, as the metadata carries it.
std::string to_hex(const std::uint8_t* bytes, std::size_t count);

template <std::size_t N>
std::string to_hex(const std::array<std::uint8_t, N>& bytes) {
    return to_hex(bytes.data(), N);
}

struct TicketHash {
    std::size_t operator()(const Ticket& ticket) const noexcept {
        // Tickets are random: any eight of their bytes make a good hash.
        std::uint64_t prefix = 0;
        std::memcpy(&prefix, ticket.data(), sizeof prefix);
        return static_cast<std::size_t>(prefix);
    }
};

}  // namespace dmabufd
