#include "delivery.hpp"

#include <unordered_map>
#include <utility>

#include "convert.hpp"
#include "dmabufd/errors.hpp"

namespace dmabufd::detail {

std::vector<Buffer> match_delivery(std::vector<DeliveredFd> delivered, const BufferInfos& infos,
                                   const std::function<Booking(std::uint64_t)>& book, bool read_only) {
    std::unordered_map<std::uint64_t, UniqueFd> by_id;
    for (DeliveredFd& entry : delivered) {
        by_id.emplace(entry.buffer_id, std::move(entry.fd));
    }
    if (by_id.size() != static_cast<std::size_t>(infos.size())) {
        throw ProtocolError("dmabufd delivered " + std::to_string(by_id.size()) + " distinct buffers for " +
                            std::to_string(infos.size()) + " it reported");
    }
    std::vector<Buffer> buffers;
    buffers.reserve(by_id.size());
    for (const v1::BufferInfo& info : infos) {
        const auto found = by_id.find(info.id());
        if (found == by_id.end()) {
            throw ProtocolError("dmabufd reported buffer " + std::to_string(info.id()) + " but delivered no fd for it");
        }
        buffers.emplace_back(std::move(found->second), from_message(info), book(info.id()), read_only);
    }
    return buffers;
}

}  // namespace dmabufd::detail
