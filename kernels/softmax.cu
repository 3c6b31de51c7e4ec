// Row softmax and softmax cross-entropy with their backwards (crates/tensor/src/cpu/softmax.rs).
//
// Row kernels: one warp per row (8 rows per 256-thread block), lanes stride over the columns, so
// any width works (attention rows of a few hundred, vocabulary rows of 30k); three passes (max,
// sum of exponentials, write) re-read the row from L1/L2.
// Bytes per element: softmax forward 8, backward 12, cross-entropy forward 8 (+4 per row),
// backward 8. HBM-bandwidth bound on an H100; expf is cheap next to the traffic.

#include "warp.cuh"

// y = exp(x - max) / sum exp(x - max) for one row, by the calling warp.
__device__ __forceinline__ void softmax_row(int cols, const float* __restrict__ x, float* __restrict__ y, int lane) {
    float m = __int_as_float(0xff800000);  // -inf
    for (int c = lane; c < cols; c += 32) m = fmaxf(m, x[c]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int c = lane; c < cols; c += 32) sum += expf(x[c] - m);
    sum = warp_sum(sum);
    for (int c = lane; c < cols; c += 32) y[c] = expf(x[c] - m) / sum;
}

extern "C" __global__ void softmax_forward_f32(int rows, int cols, const float* __restrict__ x, float* __restrict__ y) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    long long o = (long long)row * cols;
    softmax_row(cols, x + o, y + o, threadIdx.x % 32);
}

// dx = y * (dy - sum(dy * y)); overwrites dx.
extern "C" __global__ void softmax_backward_f32(int rows, int cols, const float* __restrict__ y, const float* __restrict__ dy,
                                                float* __restrict__ dx) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long long o = (long long)row * cols;
    float dot = 0.0f;
    for (int c = lane; c < cols; c += 32) dot += y[o + c] * dy[o + c];
    dot = warp_sum(dot);
    for (int c = lane; c < cols; c += 32) dx[o + c] = y[o + c] * (dy[o + c] - dot);
}

// probs = softmax(logits); row_loss[r] = -log probs[r, targets[r]]. The mean over rows is the
// loss (summed by the caller: rows is small next to rows * cols).
extern "C" __global__ void cross_entropy_forward_f32(int rows, int cols, const float* __restrict__ logits,
                                                     const int* __restrict__ targets, float* __restrict__ probs,
                                                     float* __restrict__ row_loss) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    long long o = (long long)row * cols;
    softmax_row(cols, logits + o, probs + o, lane);
    __syncwarp();
    if (lane == 0) row_loss[row] = -logf(probs[o + targets[row]]);
}

// dlogits = dloss * (probs - onehot(target)) / rows; overwrites dlogits.
extern "C" __global__ void cross_entropy_backward_f32(int rows, int cols, const float* __restrict__ probs,
                                                      const int* __restrict__ targets, float dloss,
                                                      float* __restrict__ dlogits) {
    float scale = dloss / rows;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)rows * cols;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i / cols;
        float d = probs[i] * scale;
        dlogits[i] = (i - r * cols) == targets[r] ? d - scale : d;
    }
}
