// GELU in the exact erf form BERT uses (crates/tensor/src/cpu/activation.rs), shared by the
// elementwise kernels (gelu.cu) and the GEMM epilogue (gemm.cu):
//   y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)),   dy/dx = Phi(x) + x * phi(x).
#pragma once

#define FRAC_1_SQRT_2 0.70710678118654752440f
#define FRAC_1_SQRT_2PI 0.39894228040143267794f

__device__ __forceinline__ float gelu_value(float x) { return 0.5f * x * (1.0f + erff(x * FRAC_1_SQRT_2)); }

__device__ __forceinline__ float gelu_derivative(float x) {
    float cdf = 0.5f * (1.0f + erff(x * FRAC_1_SQRT_2));
    float pdf = FRAC_1_SQRT_2PI * expf(-0.5f * x * x);
    return cdf + x * pdf;
}
