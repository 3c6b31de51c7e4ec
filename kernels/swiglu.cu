// The gated unit of Llama's MLP (crates/tensor/src/cpu/swiglu.rs): y = silu(gate) * up,
// silu(g) = g * sigmoid(g); backward dgate = dy * up * s * (1 + g * (1 - s)), dup = dy * silu(g)
// with s = sigmoid(g), recomputed from the saved inputs rather than stored.
//
// Layout: flat arrays, one element per thread in a grid-stride loop (256-thread blocks).
// Bytes per element: forward 12 (gate, up in, y out), backward 20 (gate, up, dy in, dgate, dup
// out). HBM-bandwidth bound on an H100; one expf per element is far below the SFU's rate.

#include "grid_stride.cuh"

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_forward_f32(int n, const float* __restrict__ gate, const float* __restrict__ up,
                                              float* __restrict__ y) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        y[i] = g * sigmoid(g) * up[i];
    }
}

// Overwrites dgate and dup.
extern "C" __global__ void swiglu_backward_f32(int n, const float* __restrict__ gate, const float* __restrict__ up,
                                               const float* __restrict__ dy, float* __restrict__ dgate,
                                               float* __restrict__ dup) {
    GRID_STRIDE(i, n) {
        float g = gate[i], s = sigmoid(g);
        dgate[i] = dy[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = dy[i] * g * s;
    }
}
