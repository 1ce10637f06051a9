#include "dmabufd/booking.hpp"

#include <exception>
#include <utility>

#include "dmabufd/errors.hpp"

namespace dmabufd {

Booking::Booking(std::weak_ptr<detail::Releaser> releaser, Kind kind, std::uint64_t id) noexcept
    : releaser_(std::move(releaser)), kind_(kind), id_(id), held_(true) {}

Booking::Booking(Booking&& other) noexcept
    : releaser_(std::move(other.releaser_)),
      kind_(other.kind_),
      id_(other.id_),
      held_(std::exchange(other.held_, false)) {}

Booking& Booking::operator=(Booking&& other) noexcept {
    if (this != &other) {
        release_quietly();
        releaser_ = std::move(other.releaser_);
        kind_ = other.kind_;
        id_ = other.id_;
        held_ = std::exchange(other.held_, false);
    }
    return *this;
}

Booking::~Booking() { release_quietly(); }

void Booking::release() {
    if (!std::exchange(held_, false)) {
        return;
    }
    // The client is gone: so is the session, and with it the booking.
    const std::shared_ptr<detail::Releaser> releaser = releaser_.lock();
    if (!releaser) {
        return;
    }
    if (kind_ == Kind::Pool) {
        releaser->release_pool(id_);
    } else {
        releaser->release_buffers({id_});
    }
}

void Booking::release_quietly() noexcept {
    try {
        release();
    } catch (const std::exception&) {
        // The session's end releases whatever is left.
    }
}

}  // namespace dmabufd
