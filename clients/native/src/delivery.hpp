// A call's delivered fds matched to the buffers its response lists.
#pragma once

#include <functional>
#include <vector>

#include <google/protobuf/repeated_field.h>

#include "dmabufd/buffer.hpp"
#include "dmabufd/session.hpp"
#include "dmabufd/v1/dmabufd.pb.h"

namespace dmabufd::detail {

using BufferInfos = google::protobuf::RepeatedPtrField<v1::BufferInfo>;

// One Buffer per entry of `infos`, in that order, each with the fd
// delivered for its id and the booking `book(id)` returns. Throws
// ProtocolError (closing every fd) unless the ids match one to one.
std::vector<Buffer> match_delivery(std::vector<DeliveredFd> delivered, const BufferInfos& infos,
                                   const std::function<Booking(std::uint64_t)>& book, bool read_only);

}  // namespace dmabufd::detail
