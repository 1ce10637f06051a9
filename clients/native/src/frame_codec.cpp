#include "frame_codec.hpp"

#include <endian.h>

#include <cstring>

namespace dmabufd::detail {

namespace {

bool header_ok(const dbfd_header& header, std::string& why) {
    if (std::memcmp(header.magic, DBFD_MAGIC, DBFD_MAGIC_BYTES) != 0) {
        why = "bad magic";
        return false;
    }
    if (header.version != DBFD_VERSION) {
        why = "protocol version " + std::to_string(header.version) + " (this client speaks " +
              std::to_string(DBFD_VERSION) + ")";
        return false;
    }
    return true;
}

DaemonFrame decode_hello(const std::uint8_t* data, std::size_t length) {
    if (length != DBFD_HELLO_BYTES) {
        return BadFrame{"HELLO of " + std::to_string(length) + " bytes, not " + std::to_string(DBFD_HELLO_BYTES)};
    }
    dbfd_hello wire;
    std::memcpy(&wire, data, sizeof wire);
    Hello hello;
    hello.session_id = le64toh(wire.session_id);
    std::memcpy(hello.token.data(), wire.token, hello.token.size());
    hello.pid = static_cast<std::int32_t>(le32toh(static_cast<std::uint32_t>(wire.pid)));
    hello.uid = static_cast<std::int32_t>(le32toh(static_cast<std::uint32_t>(wire.uid)));
    hello.gid = static_cast<std::int32_t>(le32toh(static_cast<std::uint32_t>(wire.gid)));
    return hello;
}

DaemonFrame decode_fds(const std::uint8_t* data, std::size_t length) {
    if (length < DBFD_MIN_FDS_FRAME_BYTES || (length - DBFD_FDS_HEAD_BYTES) % DBFD_FDS_ID_BYTES != 0) {
        return BadFrame{"FDS frame of " + std::to_string(length) + " bytes"};
    }
    dbfd_fds_head head;
    std::memcpy(&head, data, sizeof head);
    FdsFrame frame;
    std::memcpy(frame.ticket.data(), head.ticket, frame.ticket.size());
    frame.first_index = le32toh(head.first_index);
    frame.total = le32toh(head.total);
    const std::size_t count = (length - DBFD_FDS_HEAD_BYTES) / DBFD_FDS_ID_BYTES;
    if (static_cast<std::uint64_t>(frame.first_index) + count > frame.total) {
        return BadFrame{"FDS frame's ids run past its total"};
    }
    frame.buffer_ids.resize(count);
    for (std::size_t i = 0; i < count; ++i) {
        std::uint64_t id;
        // The ids sit at offset 32 of an unaligned buffer: copy, never cast.
        std::memcpy(&id, data + DBFD_FDS_HEAD_BYTES + i * DBFD_FDS_ID_BYTES, sizeof id);
        frame.buffer_ids[i] = le64toh(id);
    }
    return frame;
}

DaemonFrame decode_error(const std::uint8_t* data, std::size_t length) {
    if (length < DBFD_ERROR_HEAD_BYTES || length > DBFD_ERROR_HEAD_BYTES + DBFD_ERROR_MESSAGE_MAX) {
        return BadFrame{"ERROR frame of " + std::to_string(length) + " bytes"};
    }
    dbfd_error_head head;
    std::memcpy(&head, data, sizeof head);
    ErrorFrame frame;
    frame.code = le32toh(head.code);
    frame.message = lenient_utf8(data + DBFD_ERROR_HEAD_BYTES, length - DBFD_ERROR_HEAD_BYTES);
    return frame;
}

// Bytes in the UTF-8 sequence `lead` starts, 0 if it cannot start one.
std::size_t sequence_length(std::uint8_t lead) {
    if (lead < 0x80) return 1;
    if (lead >= 0xc2 && lead <= 0xdf) return 2;
    if (lead >= 0xe0 && lead <= 0xef) return 3;
    if (lead >= 0xf0 && lead <= 0xf4) return 4;
    return 0;
}

}  // namespace

DaemonFrame decode_daemon_frame(const std::uint8_t* data, std::size_t length) {
    if (length < DBFD_HEADER_BYTES) {
        return BadFrame{"frame of " + std::to_string(length) + " bytes is shorter than the header"};
    }
    if (length > DBFD_MAX_FRAME_BYTES) {
        return BadFrame{"frame of " + std::to_string(length) + " bytes is longer than any frame"};
    }
    dbfd_header header;
    std::memcpy(&header, data, sizeof header);
    std::string why;
    if (!header_ok(header, why)) {
        return BadFrame{why};
    }
    switch (header.type) {
        case DBFD_FRAME_HELLO: return decode_hello(data, length);
        case DBFD_FRAME_FDS: return decode_fds(data, length);
        case DBFD_FRAME_ERROR: return decode_error(data, length);
        case DBFD_FRAME_TICKET:
        case DBFD_FRAME_FILE: return BadFrame{"the daemon sent a client's frame type " + std::to_string(header.type)};
        default: return BadFrame{"unknown frame type " + std::to_string(header.type)};
    }
}

dbfd_ticket encode_ticket(dbfd_frame_type type, const Ticket& ticket) {
    dbfd_ticket frame{};
    std::memcpy(frame.header.magic, DBFD_MAGIC, DBFD_MAGIC_BYTES);
    frame.header.version = DBFD_VERSION;
    frame.header.type = static_cast<std::uint8_t>(type);
    frame.header.reserved = 0;
    std::memcpy(frame.ticket, ticket.data(), ticket.size());
    return frame;
}

std::string lenient_utf8(const std::uint8_t* bytes, std::size_t length) {
    static constexpr char kReplacement[] = "\xef\xbf\xbd";
    std::string text;
    text.reserve(length);
    std::size_t i = 0;
    while (i < length) {
        const std::size_t need = sequence_length(bytes[i]);
        bool valid = need != 0 && i + need <= length;
        for (std::size_t k = 1; valid && k < need; ++k) {
            valid = (bytes[i + k] & 0xc0) == 0x80;
        }
        // Overlong three-byte forms, UTF-16 surrogates, and four-byte
        // forms past U+10FFFF are not UTF-8 either.
        if (valid && need == 3) {
            valid = !(bytes[i] == 0xe0 && bytes[i + 1] < 0xa0) && !(bytes[i] == 0xed && bytes[i + 1] >= 0xa0);
        }
        if (valid && need == 4) {
            valid = !(bytes[i] == 0xf0 && bytes[i + 1] < 0x90) && !(bytes[i] == 0xf4 && bytes[i + 1] >= 0x90);
        }
        if (valid) {
            text.append(reinterpret_cast<const char*>(bytes + i), need);
            i += need;
        } else {
            text.append(kReplacement);
            ++i;
        }
    }
    return text;
}

}  // namespace dmabufd::detail
