// Deliberately broken kernels: the emulator tests prove each bug is caught. Compiled into the
// emulator only for this crate's tests (feature `planted-kernels`), never part of kernels/.
//
// Each GEMM here has gemm_f32_nn's signature: (m, n, k, a, b, c, beta), a 16 x 16 tile per
// 16 x 16-thread block, and exactly one bug.

#define TILE 16

// Bug: no barrier between filling the tiles and reading them, so threads read tile entries their
// neighbours have not written yet.
extern "C" __global__ void planted_gemm_missing_sync(int m, int n, int k, const float* a, const float* b, float* c,
                                                     float beta) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        as[ty][tx] = row < m && k0 + tx < k ? a[row * k + k0 + tx] : 0.0f;
        bs[ty][tx] = col < n && k0 + ty < k ? b[(k0 + ty) * n + col] : 0.0f;
        for (int kk = 0; kk < TILE; ++kk) acc += as[ty][kk] * bs[kk][tx];
        __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = beta == 0.0f ? acc : beta * c[row * n + col] + acc;
}

// Bug: the k bound of the tile loads is off by one (k - 1), dropping the last product term.
extern "C" __global__ void planted_gemm_off_by_one(int m, int n, int k, const float* a, const float* b, float* c,
                                                   float beta) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        as[ty][tx] = row < m && k0 + tx < k - 1 ? a[row * k + k0 + tx] : 0.0f;
        bs[ty][tx] = col < n && k0 + ty < k - 1 ? b[(k0 + ty) * n + col] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TILE; ++kk) acc += as[ty][kk] * bs[kk][tx];
        __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = beta == 0.0f ? acc : beta * c[row * n + col] + acc;
}

// The correct version of the two above, so the tests show the harness itself passes it.
extern "C" __global__ void planted_gemm_correct(int m, int n, int k, const float* a, const float* b, float* c,
                                                float beta) {
    __shared__ float as[TILE][TILE];
    __shared__ float bs[TILE][TILE];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        as[ty][tx] = row < m && k0 + tx < k ? a[row * k + k0 + tx] : 0.0f;
        bs[ty][tx] = col < n && k0 + ty < k ? b[(k0 + ty) * n + col] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < TILE; ++kk) acc += as[ty][kk] * bs[kk][tx];
        __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = beta == 0.0f ? acc : beta * c[row * n + col] + acc;
}

// Bug: even and odd threads wait at different barriers (undefined behaviour on a GPU).
extern "C" __global__ void planted_divergent_barrier(float* out) {
    __shared__ float value[256];
    value[threadIdx.x] = threadIdx.x;
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
        out[threadIdx.x] = value[(threadIdx.x + 1) % blockDim.x];
    } else {
        __syncthreads();
        out[threadIdx.x] = -value[(threadIdx.x + 1) % blockDim.x];
    }
}

// Bug: a warp shuffle with a mask naming only half the warp's live lanes.
extern "C" __global__ void planted_partial_mask_shuffle(float* out) {
    float v = __shfl_xor_sync(0x0000ffffu, (float)threadIdx.x, 1);
    out[threadIdx.x] = v;
}

// Bug: half a warp waits at a warp barrier, the other half at the block barrier: neither can
// complete (a hang on a GPU).
extern "C" __global__ void planted_deadlock(float* out) {
    if (threadIdx.x < 16) {
        __syncwarp();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// Correct warp and block collectives, including threads that exit before a barrier: nothing may
// be reported. Launch with `live` a multiple of 32: out[i] = 496 (the sum of a warp's lane ids)
// for every thread that stayed.
extern "C" __global__ void planted_collectives_ok(int live, float* out) {
    if (threadIdx.x >= live) return;
    float v = threadIdx.x % 32;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __shared__ float sums[1024];
    sums[threadIdx.x] = v;
    __syncthreads();
    out[threadIdx.x] = sums[(threadIdx.x + 32) % live];
}

// Correct warp votes: out[4 t .. 4 t + 4] = ballot(lane % 3 == 0), all(lane < 32), any(lane == 5),
// all(lane < 5).
extern "C" __global__ void planted_votes_ok(unsigned* out) {
    int lane = threadIdx.x % 32;
    out[4 * threadIdx.x] = __ballot_sync(0xffffffffu, lane % 3 == 0);
    out[4 * threadIdx.x + 1] = __all_sync(0xffffffffu, lane < 32);
    out[4 * threadIdx.x + 2] = __any_sync(0xffffffffu, lane == 5);
    out[4 * threadIdx.x + 3] = __all_sync(0xffffffffu, lane < 5);
}
