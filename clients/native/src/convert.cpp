#include "convert.hpp"

namespace dmabufd::detail {

BufferInfo from_message(const v1::BufferInfo& message) {
    BufferInfo info;
    info.id = message.id();
    info.size = message.size();
    info.heap = message.heap();
    info.backend = static_cast<Backend>(message.backend());
    info.kernel_name = message.kernel_name();
    info.usage = message.usage();
    info.created_at = message.created_at();
    info.inode = message.inode();
    return info;
}

HeapInfo from_message(const v1::Heap& message) {
    HeapInfo heap;
    const v1::HeapCapabilities& capabilities = message.capabilities();
    heap.name = message.name();
    heap.device_path = message.device_path();
    heap.backend = static_cast<Backend>(capabilities.backend());
    heap.device_importable = capabilities.device_importable();
    heap.max_buffer_bytes = capabilities.max_buffer_bytes();
    heap.zeroed = capabilities.zeroed();
    heap.cpu_sync_required = capabilities.cpu_sync_required();
    heap.granule_bytes = capabilities.granule_bytes();
    heap.aliases.assign(message.aliases().begin(), message.aliases().end());
    heap.allowed = message.allowed();
    return heap;
}

GrantOffer from_message(const v1::GrantInfo& message) {
    GrantOffer offer;
    offer.id = message.grant_id();
    offer.from_uid = message.from_uid();
    offer.from_pid = message.from_pid();
    offer.buffer_count = message.buffer_count();
    offer.bytes = message.bytes();
    offer.read_only = message.read_only();
    offer.pool_id = message.pool_id();
    return offer;
}

PlaneLayout from_message(const v1::PlaneLayout& message) {
    PlaneLayout plane;
    plane.buffer_index = message.buffer_index();
    plane.offset = message.offset();
    plane.stride = message.stride();
    plane.size = message.size();
    return plane;
}

ImageFormat from_message(const v1::ImageFormat& message) {
    ImageFormat format;
    format.fourcc = message.fourcc();
    format.width = message.width();
    format.height = message.height();
    format.stride_align = message.stride_align();
    return format;
}

SessionStats from_message(const v1::ClientStats& message) {
    SessionStats stats;
    stats.session_id = message.session_id();
    stats.buffer_count = message.buffer_count();
    stats.bytes = message.bytes();
    stats.quota_bytes = message.quota_bytes();
    stats.quota_buffers = message.quota_buffers();
    stats.charged_bytes = message.charged_bytes();
    stats.charged_buffers = message.charged_buffers();
    return stats;
}

void to_message(const ImageFormat& format, v1::ImageFormat& message) {
    message.set_fourcc(format.fourcc);
    message.set_width(format.width);
    message.set_height(format.height);
    message.set_stride_align(format.stride_align);
}

}  // namespace dmabufd::detail
