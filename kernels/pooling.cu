// Sentence-embedding pooling (crates/tensor/src/cpu/pooling.rs): masked mean over tokens, then
// L2 normalisation, with sentence-transformers' epsilons (token count >= 1e-9, norm >= 1e-12).
//
// mean_pool_forward: one thread per (batch, feature), looping over the sequence: coalesced
// across features, 4 bytes read per input element. mean_pool_backward: one warp per token row,
// the token count summed by the warp from the mask; 4 bytes written per element.
// l2_normalize: one warp per row with shuffle reductions; 8 bytes (forward) or 12 (backward)
// per element. All HBM-bandwidth bound and tiny next to the encoder.

#include "warp.cuh"
#define MIN_TOKEN_COUNT 1e-9f
#define MIN_NORM 1e-12f

// x [batch, seq, dim], mask [batch, seq] (1 real token, 0 padding), out [batch, dim].
extern "C" __global__ void mean_pool_forward_f32(int batch, int seq, int dim, const float* __restrict__ x,
                                                 const float* __restrict__ mask, float* __restrict__ out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)batch * dim;
         i += (long long)blockDim.x * gridDim.x) {
        long long b = i / dim, d = i - b * dim;
        const float* m = mask + b * seq;
        float acc = 0.0f, count = 0.0f;
        for (int t = 0; t < seq; ++t) {
            count += m[t];
            if (m[t] != 0.0f) acc += m[t] * x[(b * seq + t) * dim + d];
        }
        out[i] = acc / fmaxf(count, MIN_TOKEN_COUNT);
    }
}

// dx[b, t, :] = mask[b, t] / count[b] * dout[b, :]; overwrites dx. One warp per (b, t).
extern "C" __global__ void mean_pool_backward_f32(int batch, int seq, int dim, const float* __restrict__ mask,
                                                  const float* __restrict__ dout, float* __restrict__ dx) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= batch * seq) return;
    int b = row / seq;
    float count = 0.0f;
    for (int t = lane; t < seq; t += 32) count += mask[b * seq + t];
    float w = mask[row] / fmaxf(warp_sum(count), MIN_TOKEN_COUNT);
    for (int d = lane; d < dim; d += 32) dx[(long long)row * dim + d] = w * dout[(long long)b * dim + d];
}

// y = x / max(|x|, eps) per row; norms[r] = |x_r| for the backward.
extern "C" __global__ void l2_normalize_forward_f32(int rows, int dim, const float* __restrict__ x,
                                                    float* __restrict__ y, float* __restrict__ norms) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* xr = x + (long long)row * dim;
    float ss = 0.0f;
    for (int d = lane; d < dim; d += 32) ss += xr[d] * xr[d];
    float norm = sqrtf(warp_sum(ss));
    float denom = fmaxf(norm, MIN_NORM);
    for (int d = lane; d < dim; d += 32) y[(long long)row * dim + d] = xr[d] / denom;
    if (lane == 0) norms[row] = norm;
}

// dx = (dy - y (y . dy)) / |x|, or dy / eps where the norm was clamped; overwrites dx.
extern "C" __global__ void l2_normalize_backward_f32(int rows, int dim, const float* __restrict__ y,
                                                     const float* __restrict__ norms, const float* __restrict__ dy,
                                                     float* __restrict__ dx) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long long o = (long long)row * dim;
    float norm = norms[row];
    if (norm < MIN_NORM) {
        for (int d = lane; d < dim; d += 32) dx[o + d] = dy[o + d] / MIN_NORM;
        return;
    }
    float dot = 0.0f;
    for (int d = lane; d < dim; d += 32) dot += y[o + d] * dy[o + d];
    dot = warp_sum(dot);
    for (int d = lane; d < dim; d += 32) dx[o + d] = (dy[o + d] - y[o + d] * dot) / norm;
}
