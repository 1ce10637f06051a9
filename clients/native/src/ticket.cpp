#include "dmabufd/ticket.hpp"

#include <sys/random.h>

#include <cerrno>

#include "dmabufd/errors.hpp"

namespace dmabufd {

Ticket random_ticket() {
    Ticket ticket{};
    std::size_t filled = 0;
    while (filled < ticket.size()) {
        const ssize_t got = ::getrandom(ticket.data() + filled, ticket.size() - filled, 0);
        if (got < 0) {
            if (errno == EINTR) {
                continue;
            }
            throw SystemError("getrandom for a ticket", errno);
        }
        filled += static_cast<std::size_t>(got);
    }
    return ticket;
}

std::string to_hex(const std::uint8_t* bytes, std::size_t count) {
    static constexpr char kDigits[] = "0123456789abcdef";
    std::string hex;
    hex.reserve(count * 2);
    for (std::size_t i = 0; i < count; ++i) {
        hex.push_back(kDigits[bytes[i] >> 4]);
        hex.push_back(kDigits[bytes[i] & 0x0f]);
    }
    return hex;
}

}  // namespace dmabufd
