// Booking: ownership of an entry in the daemon's books.
//
// The daemon books every buffer (or pool) it hands out to the session
// that asked, and charges it to the uid's quota until Release (or
// ReleasePool) or the session's end. A Booking is that entry as a
// move-only value: destroying one still held releases it, best effort
// (errors are swallowed: a destructor cannot report them; the session's
// end releases whatever is left). release() does it now and throws.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace dmabufd {

namespace detail {
// What a Booking releases through: the client's gRPC side.
class Releaser {
public:
    virtual ~Releaser() = default;
    virtual void release_buffers(const std::vector<std::uint64_t>& buffer_ids) = 0;
    virtual void release_pool(std::uint64_t pool_id) = 0;
};
}  // namespace detail

class Booking {
public:
    enum class Kind { Buffer, Pool };

    Booking() noexcept = default;  // holds nothing: booked elsewhere (a grant's, a pool's buffer)
    Booking(std::weak_ptr<detail::Releaser> releaser, Kind kind, std::uint64_t id) noexcept;
    Booking(Booking&& other) noexcept;
    Booking& operator=(Booking&& other) noexcept;
    Booking(const Booking&) = delete;
    Booking& operator=(const Booking&) = delete;
    ~Booking();

    bool held() const noexcept { return held_; }
    // Releases now; throws the daemon's error. Not held afterwards, even then.
    void release();
    // Leaves the entry to the session's end.
    void abandon() noexcept { held_ = false; }

private:
    void release_quietly() noexcept;

    std::weak_ptr<detail::Releaser> releaser_;
    Kind kind_ = Kind::Buffer;
    std::uint64_t id_ = 0;
    bool held_ = false;
};

}  // namespace dmabufd
