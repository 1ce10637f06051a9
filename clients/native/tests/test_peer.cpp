// The second process of the conformance suite: a client of its own (its
// own session and channel), started by posix_spawn. Prints key=value
// lines; exits 0 when what it was asked to check holds.
//
//   dmabufd_test_peer verify-fd SIZE SEED                      (the buffer is fd 3)
//   dmabufd_test_peer redeem-token RUNTIME_DIR TOKEN SIZE SEED
//   dmabufd_test_peer redeem-grant RUNTIME_DIR GRANT_ID SIZE SEED
//   dmabufd_test_peer redeem-pool RUNTIME_DIR TOKEN SEED
//   dmabufd_test_peer redeem-error RUNTIME_DIR TOKEN
#include <fcntl.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <typeinfo>

#include "dmabufd/dmabufd.hpp"
#include "support/pattern.hpp"

namespace {

using dmabufd_test::first_mismatch;

int usage() {
    std::fprintf(stderr, "usage: see the top of test_peer.cpp\n");
    return 2;
}

std::uint64_t number(const char* text) { return std::strtoull(text, nullptr, 10); }

dmabufd::Client connect(const char* runtime_dir) {
    dmabufd::ConnectOptions options;
    options.runtime_dir = runtime_dir;
    options.timeout = std::chrono::seconds(60);
    return dmabufd::Client::connect(options);
}

// Checks one buffer holds the pattern of `seed`; prints what it found.
bool verify(const dmabufd::Buffer& buffer, std::uint64_t size, std::uint32_t seed, const std::string& label) {
    if (buffer.size() < size) {
        std::printf("%s size=%llu too_small\n", label.c_str(), static_cast<unsigned long long>(buffer.size()));
        return false;
    }
    const dmabufd::Mapping mapping = buffer.map(dmabufd::Access::Read);
    const std::size_t bad = first_mismatch(mapping.data(), static_cast<std::size_t>(size), seed);
    std::printf("%s synced=%d mismatch=%lld\n", label.c_str(), mapping.synced() ? 1 : 0,
                bad == size ? -1LL : static_cast<long long>(bad));
    return bad == size;
}

void describe_access(const dmabufd::Buffer& buffer) {
    const int mode = ::fcntl(buffer.fd(), F_GETFL) & O_ACCMODE;
    std::printf("accmode=%s\n", mode == O_RDONLY ? "RDONLY" : mode == O_RDWR ? "RDWR" : "OTHER");
    void* writable = ::mmap(nullptr, buffer.size(), PROT_READ | PROT_WRITE, MAP_SHARED, buffer.fd(), 0);
    if (writable == MAP_FAILED) {
        std::printf("write_map=refused errno=%d\n", errno);
    } else {
        std::printf("write_map=allowed\n");
        ::munmap(writable, buffer.size());
    }
}

int redeemed_buffers(const dmabufd::Redeemed& redeemed, std::uint64_t size, std::uint32_t seed) {
    std::printf("redeemed buffers=%zu read_only=%d grant=%llu\n", redeemed.buffers.size(), redeemed.read_only ? 1 : 0,
                static_cast<unsigned long long>(redeemed.grant_id));
    bool all_good = !redeemed.buffers.empty();
    for (std::size_t i = 0; i < redeemed.buffers.size(); ++i) {
        all_good = verify(redeemed.buffers[i], size, seed + static_cast<std::uint32_t>(i),
                          "buffer" + std::to_string(i)) && all_good;
    }
    if (!redeemed.buffers.empty()) {
        describe_access(redeemed.buffers.front());
    }
    return all_good ? 0 : 1;
}

int run(int argc, char** argv) {
    const std::string command = argc > 1 ? argv[1] : "";
    if (command == "verify-fd" && argc == 4) {
        const std::size_t size = number(argv[2]);
        // Probe: this process knows nothing of the buffer but its fd.
        const dmabufd::Mapping mapping(3, size, dmabufd::Access::Read, dmabufd::CpuSync::Probe);
        const std::size_t bad = first_mismatch(mapping.data(), size, static_cast<std::uint32_t>(number(argv[3])));
        std::printf("verify-fd synced=%d mismatch=%lld\n", mapping.synced() ? 1 : 0,
                    bad == size ? -1LL : static_cast<long long>(bad));
        return bad == size ? 0 : 1;
    }
    if (command == "redeem-token" && argc == 6) {
        dmabufd::Client client = connect(argv[2]);
        return redeemed_buffers(client.redeem(std::string(argv[3])), number(argv[4]),
                                static_cast<std::uint32_t>(number(argv[5])));
    }
    if (command == "redeem-grant" && argc == 6) {
        dmabufd::Client client = connect(argv[2]);
        return redeemed_buffers(client.redeem(number(argv[3])), number(argv[4]),
                                static_cast<std::uint32_t>(number(argv[5])));
    }
    if (command == "redeem-pool" && argc == 5) {
        dmabufd::Client client = connect(argv[2]);
        dmabufd::Redeemed redeemed = client.redeem(std::string(argv[3]));
        if (!redeemed.pool) {
            std::printf("no_pool\n");
            return 1;
        }
        const dmabufd::Pool& pool = *redeemed.pool;
        std::printf("pool id=%llu frames=%zu per_frame=%zu planes=%zu fourcc=%s booked=%d\n",
                    static_cast<unsigned long long>(pool.id()), pool.frame_count(), pool.buffers_per_frame(),
                    pool.planes().size(), pool.format().fourcc.c_str(), pool.booked() ? 1 : 0);
        const std::uint32_t seed = static_cast<std::uint32_t>(number(argv[4]));
        bool all_good = true;
        for (std::size_t i = 0; i < pool.buffers().size(); ++i) {
            const dmabufd::Buffer& buffer = pool.buffers()[i];
            all_good = verify(buffer, buffer.size(), seed + static_cast<std::uint32_t>(i),
                              "buffer" + std::to_string(i)) && all_good;
        }
        return all_good ? 0 : 1;
    }
    if (command == "redeem-error" && argc == 4) {
        dmabufd::Client client = connect(argv[2]);
        try {
            client.redeem(std::string(argv[3]));
        } catch (const dmabufd::Error& error) {
            std::printf("error status=%s reason=%s\n", dmabufd::status_name(error.status()), error.reason().c_str());
            return 0;
        }
        std::printf("redeemed\n");
        return 1;
    }
    return usage();
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const dmabufd::Error& error) {
        std::printf("failed %s status=%s reason=%s: %s\n", typeid(error).name(), dmabufd::status_name(error.status()),
                    error.reason().c_str(), error.what());
        return 3;
    }
}
