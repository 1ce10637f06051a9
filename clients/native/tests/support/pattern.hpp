// A byte pattern that differs per buffer (seed), per offset and per page,
// so a wrong buffer, a shifted copy or a stale page all show.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dmabufd_test {

inline std::uint8_t pattern_byte(std::size_t offset, std::uint32_t seed) {
    return static_cast<std::uint8_t>(offset * 131u + seed * 7u + (offset >> 12) * 29u + 1u);
}

void fill_pattern(std::uint8_t* bytes, std::size_t size, std::uint32_t seed);
// The offset of the first wrong byte, or `size` when all are right.
std::size_t first_mismatch(const std::uint8_t* bytes, std::size_t size, std::uint32_t seed);

}  // namespace dmabufd_test
