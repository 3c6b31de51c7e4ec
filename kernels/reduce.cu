// Sum of squares of a flat buffer (the global gradient norm for clipping), deterministic:
// pass 1 writes one partial sum per block (a grid-stride loop, then a fixed-shape tree over the
// block), pass 2 sums the partials in one block the same way. No atomics, no inter-block waits:
// the result depends only on n and the grid size, both fixed by the host for a given n.
//
// Bytes per element: 4 read. HBM-bandwidth bound on an H100 once the grid fills the SMs (the
// host launches up to 1024 blocks of 256 threads); pass 2 reads at most 4 KiB.

#include "warp.cuh"
#define REDUCE_THREADS 256

// The sum of `v` over the block's REDUCE_THREADS threads, valid in thread 0: the values go
// through shared memory, the first warp adds them in strides of 32, then a shuffle tree. (One
// barrier and one warp's shuffles: the CPU emulator pays for every collective of every thread.)
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float values[REDUCE_THREADS];
    values[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x >= 32) return 0.0f;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < REDUCE_THREADS; i += 32) sum += values[i];
    return warp_sum(sum);
}

// partial[blockIdx.x] = sum of x[i]^2 over this block's grid-stride elements. 256 threads.
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    sum_squares_partial_f32(int n, const float* __restrict__ x, float* __restrict__ partial) {
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = sum of partial[0..count). One block of 256 threads.
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
    sum_partials_f32(int count, const float* __restrict__ partial, float* __restrict__ out) {
    float acc = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = acc;
}
