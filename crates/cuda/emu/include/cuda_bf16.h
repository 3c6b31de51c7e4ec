// Emulator stand-in for CUDA's cuda_bf16.h: storage-only bfloat16 with round-to-nearest-even
// conversions.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    std::uint16_t bits;
};

inline __nv_bfloat16 __float2bfloat16(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return {static_cast<std::uint16_t>((x >> 16) | 0x40u)};  // quiet NaN
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return {static_cast<std::uint16_t>(x >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
    std::uint32_t x = static_cast<std::uint32_t>(h.bits) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
