// dmabufd.v1 messages to the library's plain values.
#pragma once

#include "dmabufd/buffer_info.hpp"
#include "dmabufd/grant.hpp"
#include "dmabufd/pool.hpp"
#include "dmabufd/v1/dmabufd.pb.h"

namespace dmabufd::detail {

BufferInfo from_message(const v1::BufferInfo& message);
HeapInfo from_message(const v1::Heap& message);
GrantOffer from_message(const v1::GrantInfo& message);
PlaneLayout from_message(const v1::PlaneLayout& message);
ImageFormat from_message(const v1::ImageFormat& message);
SessionStats from_message(const v1::ClientStats& message);

void to_message(const ImageFormat& format, v1::ImageFormat& message);

}  // namespace dmabufd::detail
