// The loop every flat elementwise kernel runs: element i of n, for i from this thread's global
// index in steps of the whole grid (grid_stride() in crates/cuda/src/kernels/mod.rs caps the
// grid, so large arrays take several rounds rather than millions of blocks).
#pragma once

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)
