#include "pattern.hpp"

namespace dmabufd_test {

void fill_pattern(std::uint8_t* bytes, std::size_t size, std::uint32_t seed) {
    for (std::size_t i = 0; i < size; ++i) {
        bytes[i] = pattern_byte(i, seed);
    }
}

std::size_t first_mismatch(const std::uint8_t* bytes, std::size_t size, std::uint32_t seed) {
    for (std::size_t i = 0; i < size; ++i) {
        if (bytes[i] != pattern_byte(i, seed)) {
            return i;
        }
    }
    return size;
}

}  // namespace dmabufd_test
