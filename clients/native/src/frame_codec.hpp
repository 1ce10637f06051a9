// Frames to and from bytes (fd-protocol.md section 2). Pure functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "dmabufd/fd_protocol.h"
#include "dmabufd/session.hpp"
#include "dmabufd/ticket.hpp"

namespace dmabufd::detail {

struct FdsFrame {
    Ticket ticket{};
    std::uint32_t first_index = 0;
    std::uint32_t total = 0;
    std::vector<std::uint64_t> buffer_ids;  // n >= 1: the frame must carry n fds
};

// A frame no daemon speaking version 1 sends: the session must end.
struct BadFrame {
    std::string why;
};

using DaemonFrame = std::variant<Hello, FdsFrame, ErrorFrame, BadFrame>;

// Decodes one message the daemon sent (its bytes only; the caller checks
// msg_flags and the fds against the frame).
DaemonFrame decode_daemon_frame(const std::uint8_t* data, std::size_t length);

// A TICKET or FILE frame for `ticket`.
dbfd_ticket encode_ticket(dbfd_frame_type type, const Ticket& ticket);

// UTF-8 with every invalid sequence replaced by U+FFFD: the daemon cuts
// ERROR messages at 1024 bytes, possibly inside a character.
std::string lenient_utf8(const std::uint8_t* bytes, std::size_t length);

}  // namespace dmabufd::detail
