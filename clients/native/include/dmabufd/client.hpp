// Client: a session with dmabufd, its fd socket and its gRPC channel.
//
//   auto client = dmabufd::Client::connect();
//   dmabufd::AllocateOptions camera;
//   camera.usage = "camera";  // the first heap present on the camera route
//   auto frames = client.allocate_batch(4 << 20, 8, camera);
//   {
//       auto mapping = frames[0].map(dmabufd::Access::Write);  // SYNC START ... END
//       std::memset(mapping.data(), 0xff, 16);
//   }
//   int fd = frames[0].fd();  // queue it to V4L2, pass it on...
//   // frames going out of scope: fds closed, buffers released
//
// Every call sends a fresh ticket on the fd socket, then makes the gRPC
// call with the session metadata; the fds the call delivers are taken
// from the session by the call's ticket. Methods are safe to call from
// several threads at once. Errors are thrown as dmabufd::Error
// subclasses (errors.hpp).
//
// Fork: gRPC C++ is not fork-safe. Do not fork() a process that has a
// Client (or fork before the first one); start helpers with posix_spawn
// or fork+exec at once, and give each process its own Client.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "dmabufd/buffer.hpp"
#include "dmabufd/buffer_info.hpp"
#include "dmabufd/grant.hpp"
#include "dmabufd/pool.hpp"
#include "dmabufd/session.hpp"

namespace dmabufd {

namespace detail {
class ClientCore;
}

struct ConnectOptions {
    std::string runtime_dir;                   // empty: default_runtime_dir()
    ReaderMode reader = ReaderMode::OwnThread;  // see session.hpp
    std::chrono::milliseconds timeout{10000};  // to connect, and each call's deadline
};

class Client {
public:
    // Opens the fd socket (HELLO), then the gRPC channel, waiting for it
    // to connect within the timeout.
    static Client connect(const ConnectOptions& options = {});

    Client(Client&&) noexcept;
    Client& operator=(Client&&) noexcept;
    ~Client();  // ends the session: the daemon releases what it still books

    Session& session();
    const std::string& runtime_dir() const;

    std::vector<HeapInfo> heaps();

    Buffer allocate(std::uint64_t size, const AllocateOptions& options = {});
    // `count` buffers of `size` bytes in one call, all or none.
    std::vector<Buffer> allocate_batch(std::uint64_t size, std::uint32_t count, const AllocateOptions& options = {});
    // Takes buffers off the session's books (their fds are not touched);
    // returns the bytes released.
    std::uint64_t release(const std::vector<std::uint64_t>& buffer_ids);
    // Closes the buffers' fds, then releases all those booked here in one call.
    std::uint64_t release_all(std::vector<Buffer> buffers);
    std::vector<BufferInfo> buffers();
    BufferInfo describe(std::uint64_t buffer_id);
    SessionStats stats();

    Pool allocate_pool(const PoolRequest& request);
    std::uint64_t release_pool(std::uint64_t pool_id);

    GrantHandle grant(const std::vector<std::uint64_t>& buffer_ids, const GrantTo& to, bool read_only = false);
    GrantHandle grant_pool(std::uint64_t pool_id, const GrantTo& to, bool read_only = false);
    Redeemed redeem(const std::string& token);
    Redeemed redeem(std::uint64_t grant_id);
    void revoke(std::uint64_t grant_id);
    GrantList grants();

private:
    explicit Client(std::shared_ptr<detail::ClientCore> core);
    std::shared_ptr<detail::ClientCore> core_;
};

}  // namespace dmabufd
