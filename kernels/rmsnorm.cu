// RMS normalisation over the last dimension (crates/tensor/src/cpu/rmsnorm.rs, Llama's
// LlamaRMSNorm): y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), saving rstd per row.
//
// Forward and the dx backward: one warp per row (8 rows per 256-thread block), a warp-shuffle
// reduction of the row's sum (of x^2, or of dy*w*xhat), then one more pass over the row, re-read
// from L1/L2 rather than HBM. Bytes per element: forward 8 (x in, y out), dx 12 (x, dy in, dx out).
// dw is a column reduction over rows in the layout of layernorm_backward_params_f32 (32 columns
// x 8 row-lanes per block): deterministic, no atomics, 8 more bytes per element. Everything here
// is HBM-bandwidth bound on an H100.

#include "warp.cuh"

extern "C" __global__ void rmsnorm_forward_f32(int rows, int cols, float eps, const float* __restrict__ x,
                                               const float* __restrict__ w, float* __restrict__ y,
                                               float* __restrict__ rstd) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long long)row * cols;
    float sq = 0.0f;
    for (int c = lane; c < cols; c += 32) sq += xr[c] * xr[c];
    float rs = 1.0f / sqrtf(warp_sum(sq) / cols + eps);
    float* yr = y + (long long)row * cols;
    for (int c = lane; c < cols; c += 32) yr[c] = xr[c] * rs * w[c];
    if (lane == 0) rstd[row] = rs;
}

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)), xhat = x*rstd; overwrites dx.
extern "C" __global__ void rmsnorm_backward_dx_f32(int rows, int cols, const float* __restrict__ x,
                                                   const float* __restrict__ w, const float* __restrict__ rstd,
                                                   const float* __restrict__ dy, float* __restrict__ dx) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long long o = (long long)row * cols;
    float rs = rstd[row];
    float sum = 0.0f;
    for (int c = lane; c < cols; c += 32) sum += dy[o + c] * w[c] * (x[o + c] * rs);
    float mean = warp_sum(sum) / cols;
    for (int c = lane; c < cols; c += 32) dx[o + c] = rs * (dy[o + c] * w[c] - x[o + c] * rs * mean);
}

// dw[c] += sum_r dy[r,c] * x[r,c] * rstd[r]. Block (32, 8).
extern "C" __global__ void rmsnorm_backward_dw_f32(int rows, int cols, const float* __restrict__ x,
                                                   const float* __restrict__ rstd, const float* __restrict__ dy,
                                                   float* __restrict__ dw) {
    __shared__ float partial[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float sum = 0.0f;
    if (c < cols)
        for (int r = threadIdx.y; r < rows; r += 8) {
            long long i = (long long)r * cols + c;
            sum += dy[i] * (x[i] * rstd[r]);
        }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float total = 0.0f;
        for (int k = 0; k < 8; ++k) total += partial[k][threadIdx.x];
        dw[c] += total;
    }
}
