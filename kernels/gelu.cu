// GELU in the exact erf form BERT uses (crates/tensor/src/cpu/activation.rs):
//   y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)),   dx = dy * (Phi(x) + x * phi(x)).
//
// Layout: flat arrays, grid-stride loop, 256-thread blocks.
// Bytes per element: forward 8, backward 12. erff and expf cost a few tens of instructions, still
// well under the ~80 FLOP/byte an H100 needs before compute would bound it: HBM bandwidth does.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)

#define FRAC_1_SQRT_2 0.70710678118654752440f
#define FRAC_1_SQRT_2PI 0.39894228040143267794f

extern "C" __global__ void gelu_forward_f32(int n, const float* __restrict__ x, float* __restrict__ y) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * FRAC_1_SQRT_2));
    }
}

// Overwrites dx.
extern "C" __global__ void gelu_backward_f32(int n, const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ dx) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erff(v * FRAC_1_SQRT_2));
        float pdf = FRAC_1_SQRT_2PI * expf(-0.5f * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}
