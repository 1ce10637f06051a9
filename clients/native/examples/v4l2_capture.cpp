// Capture from a V4L2 device into a dmabufd image pool (V4L2_MEMORY_DMABUF)
// and check every frame, byte for byte, against the driver's own
// V4L2_MEMORY_MMAP capture of the same deterministic vivid test pattern.
//
//   dmabufd_v4l2_capture --device /dev/video0 [--format YUYV] [--size 640x480]
//                        [--frames 8] [--buffers 4] [--heap system] [--runtime-dir DIR]
//                        [--no-reference]
//
// --no-reference (a real sensor, whose frames differ) checks instead that
// frames are not flat and that they change. Prints one JSON object; exits
// 0 when every frame was verified, 1 when one was not, 2 on bad usage or
// a device that cannot do what was asked.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "dmabufd/dmabufd.hpp"
#include "v4l2_device.hpp"

namespace {

constexpr std::chrono::seconds kFrameTimeout{30};  // emulated (TCG) machines are slow
constexpr std::uint32_t kReferenceBuffers = 4;
constexpr int kReferenceFrames = 5;

struct Options {
    std::string device;
    std::string fourcc = "YUYV";
    std::uint32_t width = 640;
    std::uint32_t height = 480;
    int frames = 8;
    std::uint32_t buffers = 4;
    std::string heap;
    std::string runtime_dir;
    bool reference = true;
};

Options parse(int argc, char** argv) {
    Options options;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "--no-reference") {
            options.reference = false;
            continue;
        }
        if (i + 1 >= argc) {
            throw std::invalid_argument("missing value after " + flag);
        }
        const std::string value = argv[++i];
        if (flag == "--device") {
            options.device = value;
        } else if (flag == "--format") {
            options.fourcc = value;
        } else if (flag == "--size") {
            if (std::sscanf(value.c_str(), "%ux%u", &options.width, &options.height) != 2) {
                throw std::invalid_argument("--size is WIDTHxHEIGHT");
            }
        } else if (flag == "--frames") {
            options.frames = std::atoi(value.c_str());
        } else if (flag == "--buffers") {
            options.buffers = static_cast<std::uint32_t>(std::atoi(value.c_str()));
        } else if (flag == "--heap") {
            options.heap = value;
        } else if (flag == "--runtime-dir") {
            options.runtime_dir = value;
        } else {
            throw std::invalid_argument("unknown option " + flag);
        }
    }
    if (options.device.empty() || options.frames < 1 || options.buffers < 2) {
        throw std::invalid_argument("--device is required; --frames >= 1; --buffers >= 2");
    }
    return options;
}

// One memory plane per pool buffer of a frame: its stride and size, as
// V4L2 describes the plane (single-planar: the buffer holds every plane).
std::vector<v4l2::PlaneFormat> memory_planes(const dmabufd::Pool& pool) {
    std::vector<v4l2::PlaneFormat> planes(pool.buffers_per_frame());
    if (planes.size() == 1) {
        planes[0] = {pool.planes().front().stride, static_cast<std::uint32_t>(pool.frame_bytes())};
        return planes;
    }
    for (const dmabufd::PlaneLayout& plane : pool.planes()) {
        planes.at(plane.buffer_index) = {plane.stride, static_cast<std::uint32_t>(plane.size)};
    }
    return planes;
}

std::string describe(const std::vector<v4l2::PlaneFormat>& planes) {
    std::string text;
    for (const v4l2::PlaneFormat& plane : planes) {
        text += "(" + std::to_string(plane.bytesperline) + ", " + std::to_string(plane.sizeimage) + ") ";
    }
    return text;
}

// A frame that is one byte repeated is no picture.
bool looks_like_a_picture(const std::uint8_t* bytes, std::size_t size) {
    std::set<std::uint8_t> values;
    for (std::size_t i = 0; i < size && values.size() <= 4; i += 97) {
        values.insert(bytes[i]);
    }
    return values.size() > 4;
}

// The planes of a frame vivid put in its own (MMAP) buffers; every frame
// of the deterministic pattern must be the same.
std::vector<std::vector<std::uint8_t>> mmap_reference(v4l2::Device& device, std::size_t planes) {
    const std::uint32_t count = device.request_buffers(V4L2_MEMORY_MMAP, kReferenceBuffers);
    struct Region {
        void* address;
        std::size_t length;
    };
    std::vector<std::vector<Region>> regions(count);
    for (std::uint32_t index = 0; index < count; ++index) {
        for (const auto& [offset, length] : device.query_mmap(index, planes)) {
            void* address = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, device.fd(), offset);
            if (address == MAP_FAILED) {
                throw v4l2::Error("mmap of a V4L2 buffer", errno);
            }
            regions[index].push_back({address, length});
        }
        device.queue_mmap(index, planes);
    }
    device.stream(true);
    std::vector<std::vector<std::uint8_t>> reference;
    for (int n = 0; n < kReferenceFrames; ++n) {
        const v4l2::Dequeued frame = device.dequeue(V4L2_MEMORY_MMAP, planes, kFrameTimeout);
        if (frame.error) {
            throw std::runtime_error("vivid flagged MMAP frame " + std::to_string(frame.sequence) + " as bad");
        }
        std::vector<std::vector<std::uint8_t>> copy;
        for (std::size_t p = 0; p < frame.bytesused.size(); ++p) {
            const auto* bytes = static_cast<const std::uint8_t*>(regions[frame.index][p].address);
            copy.emplace_back(bytes, bytes + frame.bytesused[p]);
        }
        if (reference.empty()) {
            reference = std::move(copy);
        } else if (copy != reference) {
            throw std::runtime_error("MMAP frames differ: the device's pattern is not deterministic");
        }
        device.queue_mmap(frame.index, planes);
    }
    device.stream(false);
    for (auto& frame_regions : regions) {
        for (const Region& region : frame_regions) {
            ::munmap(region.address, region.length);
        }
    }
    device.request_buffers(V4L2_MEMORY_MMAP, 0);
    for (const auto& plane : reference) {
        if (!looks_like_a_picture(plane.data(), plane.size())) {
            throw std::runtime_error("the reference frame is flat: no test pattern");
        }
    }
    return reference;
}

struct Result {
    int verified = 0;
    int mismatches = 0;
    int changed = 0;  // --no-reference: frames unlike the one before
    bool synced = false;
    std::string first_problem;
};

Result capture(v4l2::Device& device, dmabufd::Pool& pool, const Options& options,
               const std::vector<std::vector<std::uint8_t>>& reference) {
    const std::size_t planes = pool.buffers_per_frame();
    const std::uint32_t count = device.request_buffers(V4L2_MEMORY_DMABUF, static_cast<std::uint32_t>(pool.frame_count()));
    if (count != pool.frame_count()) {
        throw std::runtime_error(device.path() + " took " + std::to_string(count) + " DMABUF buffers of " +
                                 std::to_string(pool.frame_count()));
    }
    auto queue = [&](std::uint32_t index) {
        std::vector<int> fds;
        std::vector<std::uint32_t> lengths;
        for (std::size_t b = 0; b < planes; ++b) {
            fds.push_back(pool.frame_buffer(index, b).fd());
            lengths.push_back(static_cast<std::uint32_t>(pool.frame_buffer(index, b).size()));
        }
        device.queue_dmabuf(index, fds, lengths);
    };
    for (std::uint32_t index = 0; index < count; ++index) {
        queue(index);
    }
    device.stream(true);
    Result result;
    std::vector<std::uint8_t> previous;
    for (int n = 0; n < options.frames; ++n) {
        const v4l2::Dequeued frame = device.dequeue(V4L2_MEMORY_DMABUF, planes, kFrameTimeout);
        bool good = !frame.error;
        std::string problem = frame.error ? "frame flagged V4L2_BUF_FLAG_ERROR" : "";
        std::vector<std::uint8_t> first_plane;
        for (std::size_t p = 0; p < planes && good; ++p) {
            // The device wrote the dma-buf; SYNC_START(READ) makes it the CPU's.
            const dmabufd::Mapping mapping = pool.frame_buffer(frame.index, p).map(dmabufd::Access::Read);
            result.synced = mapping.synced();
            const std::size_t used = frame.bytesused.at(p);
            if (options.reference) {
                good = used == reference.at(p).size() && std::memcmp(mapping.data(), reference[p].data(), used) == 0;
                if (!good) {
                    problem = "plane " + std::to_string(p) + " differs from the MMAP capture";
                }
            } else {
                good = used > 0 && looks_like_a_picture(mapping.data(), used);
                if (!good) {
                    problem = "plane " + std::to_string(p) + " is flat";
                }
                if (p == 0) {
                    first_plane.assign(mapping.data(), mapping.data() + used);
                }
            }
        }
        if (!options.reference && good) {
            result.changed += (!previous.empty() && first_plane != previous) ? 1 : 0;
            previous = std::move(first_plane);
        }
        if (good) {
            ++result.verified;
        } else {
            ++result.mismatches;
            if (result.first_problem.empty()) {
                result.first_problem = "frame " + std::to_string(frame.sequence) + ": " + problem;
            }
        }
        queue(frame.index);
    }
    device.stream(false);
    device.request_buffers(V4L2_MEMORY_DMABUF, 0);
    return result;
}

int run(const Options& options) {
    v4l2::Device device(options.device);
    const std::vector<std::string> offered = device.formats();
    if (std::find(offered.begin(), offered.end(), options.fourcc) == offered.end()) {
        std::fprintf(stderr, "%s (%s) does not offer %s\n", options.device.c_str(), device.driver().c_str(),
                     options.fourcc.c_str());
        return 2;
    }

    dmabufd::ConnectOptions connect;
    connect.runtime_dir = options.runtime_dir;
    connect.timeout = std::chrono::seconds(60);
    dmabufd::Client client = dmabufd::Client::connect(connect);
    dmabufd::PoolRequest request;
    request.format = {options.fourcc, options.width, options.height, 0};
    request.count = options.buffers;
    request.heap = options.heap;
    request.usage = "camera";
    request.name = "v4l2";
    dmabufd::Pool pool = client.allocate_pool(request);
    if (!device.multi_planar() && pool.buffers_per_frame() > 1) {
        std::fprintf(stderr, "%s needs the multi-planar API, which %s does not offer\n", options.fourcc.c_str(),
                     options.device.c_str());
        return 2;
    }

    // The driver must lay frames out exactly as the pool did.
    const std::vector<v4l2::PlaneFormat> wanted = memory_planes(pool);
    std::vector<std::uint32_t> strides;
    for (const v4l2::PlaneFormat& plane : wanted) {
        strides.push_back(plane.bytesperline);
    }
    const v4l2::Format got = device.set_format(options.fourcc, options.width, options.height, strides);
    const bool same_planes = got.planes.size() == wanted.size() &&
                             std::equal(got.planes.begin(), got.planes.end(), wanted.begin(), [](auto& a, auto& b) {
                                 return a.bytesperline == b.bytesperline && a.sizeimage == b.sizeimage;
                             });
    if (got.fourcc != options.fourcc || got.width != options.width || got.height != options.height || !same_planes) {
        std::fprintf(stderr, "%s set %s %ux%u planes %s for the pool's %s %ux%u planes %s\n", options.device.c_str(),
                     got.fourcc.c_str(), got.width, got.height, describe(got.planes).c_str(), options.fourcc.c_str(),
                     options.width, options.height, describe(wanted).c_str());
        return 2;
    }

    std::vector<std::string> controls;
    std::vector<std::vector<std::uint8_t>> reference;
    if (options.reference) {
        controls = device.make_deterministic();
        reference = mmap_reference(device, wanted.size());
    }
    const Result result = capture(device, pool, options, reference);
    const bool all_good = result.verified == options.frames && (options.reference || result.changed > 0);

    std::printf(
        "{\"device\": \"%s\", \"driver\": \"%s\", \"fourcc\": \"%s\", \"width\": %u, \"height\": %u, "
        "\"heap\": \"%s\", \"dma_buf\": %s, \"synced\": %s, \"buffers\": %zu, \"buffers_per_frame\": %zu, "
        "\"frames\": %d, \"verified\": %d, \"mismatches\": %d, \"reference\": %s, \"changed\": %d, "
        "\"controls\": %zu, \"problem\": \"%s\", \"ok\": %s}\n",
        options.device.c_str(), device.driver().c_str(), options.fourcc.c_str(), options.width, options.height,
        pool.frame_buffer(0).info().heap.c_str(), pool.frame_buffer(0).is_dma_buf() ? "true" : "false",
        result.synced ? "true" : "false", pool.frame_count(), pool.buffers_per_frame(), options.frames,
        result.verified, result.mismatches, options.reference ? "\"mmap\"" : "null", result.changed,
        controls.size(), result.first_problem.c_str(), all_good ? "true" : "false");
    return all_good ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse(argc, argv));
    } catch (const std::invalid_argument& error) {
        std::fprintf(stderr, "%s\n", error.what());
        return 2;
    } catch (const dmabufd::Error& error) {
        std::fprintf(stderr, "dmabufd: %s (%s%s%s)\n", error.what(), dmabufd::status_name(error.status()),
                     error.reason().empty() ? "" : ", ", error.reason().c_str());
        return 1;
    } catch (const std::exception& error) {
        std::fprintf(stderr, "%s\n", error.what());
        return 1;
    }
}
