// GELU (gelu.cuh) over flat arrays: grid-stride loop, 256-thread blocks. A linear layer followed
// by GELU gets it from the GEMM epilogue instead (gemm.cu); these serve GELU on its own.
// Bytes per element: forward 8, backward 12. erff and expf cost a few tens of instructions, still
// well under the ~80 FLOP/byte an H100 needs before compute would bound it: HBM bandwidth does.

#include "gelu.cuh"
#include "grid_stride.cuh"

extern "C" __global__ void gelu_forward_f32(int n, const float* __restrict__ x, float* __restrict__ y) {
    GRID_STRIDE(i, n) y[i] = gelu_value(x[i]);
}

// Overwrites dx.
extern "C" __global__ void gelu_backward_f32(int n, const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dx) {
    GRID_STRIDE(i, n) dx[i] = dy[i] * gelu_derivative(x[i]);
}
