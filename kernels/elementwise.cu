// Elementwise glue kernels (crates/tensor/src/cpu/elementwise.rs) and the f32 -> f16/bf16 casts
// that feed the tensor-core GEMM.
//
// Layout: flat arrays, one element per thread in a grid-stride loop (256-thread blocks).
// Bytes per element: add 12, axpy 12, scale 8, casts 6. (A linear layer's bias is added in the
// GEMM's epilogue, gemm.cu.)
// On an H100 every kernel here is bound by HBM bandwidth (~3.3 TB/s); none does enough
// arithmetic per byte to matter. bias_backward is a column reduction over rows: each block owns
// 32 columns and 8 row-lanes, so the result is deterministic (no atomics) and reads coalesce.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "grid_stride.cuh"

// out = a + b
extern "C" __global__ void add_f32(int n, const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out) {
    GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

// y += alpha * x
extern "C" __global__ void axpy_f32(int n, float alpha, const float* __restrict__ x, float* __restrict__ y) {
    GRID_STRIDE(i, n) y[i] += alpha * x[i];
}

// x *= alpha
extern "C" __global__ void scale_f32(int n, float alpha, float* __restrict__ x) {
    GRID_STRIDE(i, n) x[i] *= alpha;
}

// dbias[c] += sum over rows of dy[r, c]. Block (32, 8): threadIdx.x picks the column within the
// block's 32, threadIdx.y strides over rows; the 8 partial sums are combined in shared memory.
extern "C" __global__ void bias_backward_f32(int rows, int cols, const float* __restrict__ dy, float* __restrict__ dbias) {
    __shared__ float partial[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float sum = 0.0f;
    if (c < cols)
        for (int r = threadIdx.y; r < rows; r += 8) sum += dy[(long long)r * cols + c];
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float total = 0.0f;
        for (int k = 0; k < 8; ++k) total += partial[k][threadIdx.x];
        dbias[c] += total;
    }
}

extern "C" __global__ void cast_f32_to_f16(int n, const float* __restrict__ x, __half* __restrict__ y) {
    GRID_STRIDE(i, n) y[i] = __float2half(x[i]);
}

extern "C" __global__ void cast_f32_to_bf16(int n, const float* __restrict__ x, __nv_bfloat16* __restrict__ y) {
    GRID_STRIDE(i, n) y[i] = __float2bfloat16(x[i]);
}
