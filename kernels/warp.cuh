// Warp-level helpers shared by the kernel files that reduce across lanes. NVRTC receives this
// header from memory (crates/cuda/src/nvrtc.rs), the emulator build finds it in kernels/.
#pragma once

#define FULL_MASK 0xffffffffu

// Sum over each aligned group of `width` lanes (a power of two, at most 32) by butterfly
// shuffles; every lane of the group gets the total.
__device__ __forceinline__ float group_sum(float v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum(v, 32); }

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}
