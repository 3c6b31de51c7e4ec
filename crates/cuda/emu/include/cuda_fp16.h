// Emulator stand-in for CUDA's cuda_fp16.h: a storage-only IEEE binary16 with the conversions the
// kernels use (round to nearest even, as __float2half does).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
    std::uint16_t bits;
};

inline __half __float2half(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    std::uint16_t sign = (x >> 16) & 0x8000u;
    std::uint32_t abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // inf or NaN
        return {static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
    }
    if (abs >= 0x477ff000u) {  // rounds to a magnitude beyond 65504
        return {static_cast<std::uint16_t>(sign | 0x7c00u)};
    }
    if (abs < 0x38800000u) {  // half subnormal or zero: scale so the value's ulp is 2^-24
        float magnitude;
        std::memcpy(&magnitude, &abs, 4);
        // 2^-24 * n for the nearest integer n (the FPU rounds to nearest even).
        float scaled = magnitude * 16777216.0f + 12582912.0f;  // 1.5 * 2^23 forces integer rounding
        std::uint32_t scaled_bits;
        std::memcpy(&scaled_bits, &scaled, 4);
        return {static_cast<std::uint16_t>(sign | (scaled_bits & 0x7ffu))};
    }
    std::uint32_t mantissa_odd = (abs >> 13) & 1u;
    abs += 0xfffu + mantissa_odd;
    return {static_cast<std::uint16_t>(sign | ((abs - 0x38000000u) >> 13))};
}

inline float __half2float(__half h) {
    std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
    std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
    std::uint32_t mantissa = h.bits & 0x3ffu;
    std::uint32_t out;
    if (exponent == 0x1fu) {
        out = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent == 0) {
        float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
        std::memcpy(&out, &magnitude, 4);
        out |= sign;
    } else {
        out = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float f;
    std::memcpy(&f, &out, 4);
    return f;
}
