// Inverted dropout with the counter-based mask of crates/tensor/src/cpu/dropout.rs, bit for bit:
// element i is zeroed when the top 32 bits of splitmix64(seed ^ splitmix64(i)) fall below
// `threshold` (p * 2^32), and otherwise multiplied by keep_scale = 1/(1-p) in f32. The mask is
// never stored: the backward runs the same kernel on the gradient.
//
// Bytes per element: 8 (read x, write y); the two 64-bit hashes are ~20 integer ops, well under
// what HBM bandwidth leaves per element on an H100, so the kernel stays bandwidth-bound.

#include "grid_stride.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// y = x * mask; the 64-bit seed comes as two 32-bit words. x and y may be the same buffer.
extern "C" __global__ void dropout_f32(int n, unsigned seed_lo, unsigned seed_hi, unsigned threshold, float keep_scale,
                                       const float* x, float* y) {
    unsigned long long seed = ((unsigned long long)seed_hi << 32) | seed_lo;
    GRID_STRIDE(i, n) {
        unsigned top = (unsigned)(splitmix64(seed ^ splitmix64((unsigned long long)i)) >> 32);
        y[i] = top < threshold ? 0.0f : x[i] * keep_scale;
    }
}
