// Layer normalisation over the last dimension (crates/tensor/src/cpu/layernorm.rs):
//   y = (x - mean) * rstd * gamma + beta,  rstd = 1 / sqrt(var + eps), saving mean and rstd.
//
// Forward and the dx backward: one warp per row (8 rows per 256-thread block), two passes over
// the row (mean, then the centred variance, as the CPU reference does) with warp-shuffle
// reductions; the row is re-read from L1/L2, not HBM.
// Bytes per element: forward 8 (x in, y out; 16 with the residual: x, residual in, sum, y out),
// backward dx 12 (x, dy in, dx out).
// dgamma/dbeta are column reductions over rows, done by a second kernel in the layout of
// bias_backward (32 columns x 8 row-lanes per block): deterministic, no atomics, another 8 bytes
// per element. Everything here is HBM-bandwidth bound on an H100.

#include "warp.cuh"

// One warp per row. With a residual, the row normalised is x + residual, written to `sum` on the
// first pass (the backward's input) and re-read from L1/L2 on the second: a transformer block's
// residual connection costs no kernel and no HBM read of its own.
template <bool ADD>
__device__ __forceinline__ void layernorm_rows(int rows, int cols, float eps, const float* __restrict__ x,
                                               const float* __restrict__ residual, const float* __restrict__ gamma,
                                               const float* __restrict__ beta, float* __restrict__ sum_out,
                                               float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long long o = (long long)row * cols;
    const float* xr = ADD ? sum_out + o : x + o;
    float sum = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        float v = x[o + c];
        if (ADD) {
            v += residual[o + c];
            sum_out[o + c] = v;
        }
        sum += v;
    }
    float mu = warp_sum(sum) / cols;
    float sq = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        float d = xr[c] - mu;
        sq += d * d;
    }
    float rs = 1.0f / sqrtf(warp_sum(sq) / cols + eps);
    float* yr = y + o;
    for (int c = lane; c < cols; c += 32) yr[c] = (xr[c] - mu) * rs * gamma[c] + beta[c];
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

extern "C" __global__ void layernorm_forward_f32(int rows, int cols, float eps, const float* __restrict__ x,
                                                 const float* __restrict__ gamma, const float* __restrict__ beta,
                                                 float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd) {
    layernorm_rows<false>(rows, cols, eps, x, nullptr, gamma, beta, nullptr, y, mean, rstd);
}

// LayerNorm(x + residual), also storing the sum.
extern "C" __global__ void add_layernorm_forward_f32(int rows, int cols, float eps, const float* __restrict__ x,
                                                     const float* __restrict__ residual, const float* __restrict__ gamma,
                                                     const float* __restrict__ beta, float* __restrict__ sum,
                                                     float* __restrict__ y, float* __restrict__ mean,
                                                     float* __restrict__ rstd) {
    layernorm_rows<true>(rows, cols, eps, x, residual, gamma, beta, sum, y, mean, rstd);
}

// dx = rstd * (dy*gamma - mean(dy*gamma) - xhat * mean(dy*gamma*xhat)); overwrites dx.
extern "C" __global__ void layernorm_backward_dx_f32(int rows, int cols, const float* __restrict__ x,
                                                     const float* __restrict__ gamma, const float* __restrict__ mean,
                                                     const float* __restrict__ rstd, const float* __restrict__ dy,
                                                     float* __restrict__ dx) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long long o = (long long)row * cols;
    float mu = mean[row], rs = rstd[row];
    float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        float xhat = (x[o + c] - mu) * rs;
        float dxhat = dy[o + c] * gamma[c];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
    }
    float m1 = warp_sum(sum_dxhat) / cols;
    float m2 = warp_sum(sum_dxhat_xhat) / cols;
    for (int c = lane; c < cols; c += 32) {
        float xhat = (x[o + c] - mu) * rs;
        dx[o + c] = rs * (dy[o + c] * gamma[c] - m1 - xhat * m2);
    }
}

// dgamma[c] += sum_r dy[r,c] * xhat[r,c];  dbeta[c] += sum_r dy[r,c]. Block (32, 8).
extern "C" __global__ void layernorm_backward_params_f32(int rows, int cols, const float* __restrict__ x,
                                                         const float* __restrict__ mean, const float* __restrict__ rstd,
                                                         const float* __restrict__ dy, float* __restrict__ dgamma,
                                                         float* __restrict__ dbeta) {
    __shared__ float partial_gamma[8][33];
    __shared__ float partial_beta[8][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float sum_gamma = 0.0f, sum_beta = 0.0f;
    if (c < cols)
        for (int r = threadIdx.y; r < rows; r += 8) {
            long long i = (long long)r * cols + c;
            float xhat = (x[i] - mean[r]) * rstd[r];
            sum_gamma += dy[i] * xhat;
            sum_beta += dy[i];
        }
    partial_gamma[threadIdx.y][threadIdx.x] = sum_gamma;
    partial_beta[threadIdx.y][threadIdx.x] = sum_beta;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float g = 0.0f, b = 0.0f;
        for (int k = 0; k < 8; ++k) {
            g += partial_gamma[k][threadIdx.x];
            b += partial_beta[k][threadIdx.x];
        }
        dgamma[c] += g;
        dbeta[c] += b;
    }
}
