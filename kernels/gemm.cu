// General matrix multiply, C = act(op(A) op(B) + bias + beta C), as crates/tensor/src/cpu/gemm.rs
// with its epilogue (act: the identity or GELU, see gemm_store): A is logically m x k (stored k x m when
// transposed), B logically k x n (stored n x k when transposed), C is m x n row-major, bias
// (n values, one per column; null for none) is added as each element is stored, so a linear
// layer's bias costs no pass of its own, and beta == 0 overwrites C without reading it.
// One entry point per transpose combination (_nn, _nt, _tn, _tt: first letter A, second B).
//
// f32 (gemm_f32_*): 64 x 64 block tile, k step 16, 256 threads each owning a 4 x 4 register
// block strided by 16 rows/columns (so C stores and shared-memory reads of B coalesce). Tiles of
// A and B are staged k-major in shared memory, transposing while loading so every global read
// coalesces whatever the layout. Per k step a thread does 16 FMAs for 8 shared loads: shared
// memory bandwidth, not the FP32 units, bounds it on an H100 (roughly a third of FP32 peak).
// HBM traffic is (m n k)(1/64 + 1/64) * 4 bytes, far below that bound.
//
// Tensor cores (gemm_f16_*, gemm_bf16_*, gemm_tf32_*): f16/bf16 operands via wmma 16x16x16, or
// f32 operands rounded to TF32 (10-bit mantissa, round to nearest, ties away: cvt.rna) via wmma
// 16x16x8; f32 accumulation in all. 64 x 64 block tile, k step 32, 4 warps each owning 32 x 32
// (2 x 2 fragments). Tiles are staged row-major in shared memory (transposing while loading)
// with 8-element padding; the epilogue goes through shared memory for bounds and beta. Shared
// memory: 26 KiB (f16/bf16), 36 KiB (TF32). Bound by the shared-memory path and the small tile,
// not the tensor cores; larger tiles and cp.async pipelining are the next step.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "gelu.cuh"

// The store every tile ends with, as the CPU GEMM's epilogue: v = acc + bias[j] + beta C (C not
// read when beta == 0); with `gelu`, C receives GELU(v) and `pre_gelu`, unless null, v itself (the
// activation's backward needs it), so a training step's FFN up-projection costs no GELU pass.
__device__ __forceinline__ void gemm_store(float acc, int gi, int gj, int n, const float* __restrict__ bias, unsigned gelu,
                                           float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    long long i = (long long)gi * n + gj;
    float v = bias ? acc + bias[gj] : acc;
    if (beta != 0.0f) v += beta * c[i];
    if (gelu) {
        if (pre_gelu) pre_gelu[i] = v;
        v = gelu_value(v);
    }
    c[i] = v;
}

#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 16
#define GEMM_THREADS 256

template <bool TRANS_A, bool TRANS_B>
__device__ __forceinline__ void gemm_f32_tile(int m, int n, int k, const float* __restrict__ a,
                                              const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    __shared__ float as[GEMM_BK][GEMM_BM + 1];
    __shared__ float bs[GEMM_BK][GEMM_BN + 1];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += GEMM_BK) {
        for (int idx = tid; idx < GEMM_BM * GEMM_BK; idx += GEMM_THREADS) {
            // Consecutive threads take consecutive addresses of the stored layout.
            int row = TRANS_A ? idx % GEMM_BM : idx / GEMM_BK;
            int kk = TRANS_A ? idx / GEMM_BM : idx % GEMM_BK;
            int gi = m0 + row, gp = k0 + kk;
            float v = 0.0f;
            if (gi < m && gp < k) v = TRANS_A ? a[(long long)gp * m + gi] : a[(long long)gi * k + gp];
            as[kk][row] = v;
        }
        for (int idx = tid; idx < GEMM_BK * GEMM_BN; idx += GEMM_THREADS) {
            int col = TRANS_B ? idx / GEMM_BK : idx % GEMM_BN;
            int kk = TRANS_B ? idx % GEMM_BK : idx / GEMM_BN;
            int gj = n0 + col, gp = k0 + kk;
            float v = 0.0f;
            if (gj < n && gp < k) v = TRANS_B ? b[(long long)gj * k + gp] : b[(long long)gp * n + gj];
            bs[kk][col] = v;
        }
        __syncthreads();
        // Fully unrolled so that acc, ra and rb live in registers.
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; ++kk) {
            float ra[4], rb[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) ra[i] = as[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) rb[j] = bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += ra[i] * rb[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int gi = m0 + ty + 16 * i;
        if (gi >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int gj = n0 + tx + 16 * j;
            if (gj >= n) continue;
            gemm_store(acc[i][j], gi, gj, n, bias, gelu, pre_gelu, c, beta);
        }
    }
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_f32_nn(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_f32_tile<false, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_f32_nt(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_f32_tile<false, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_f32_tn(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_f32_tile<true, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_f32_tt(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_f32_tile<true, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}

#define WMMA_BM 64
#define WMMA_BN 64
#define WMMA_BK 32
#define WMMA_THREADS 128
#define WMMA_PAD 8

template <class T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ __half zero_of<__half>() {
    return __float2half(0.0f);
}
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() {
    return __float2bfloat16(0.0f);
}
template <>
__device__ __forceinline__ float zero_of<float>() {
    return 0.0f;
}

// TF32 operand fragments are rounded after loading (CUDA leaves the low 13 bits undefined
// otherwise); 16-bit fragments are used as loaded.
template <class Use, class Layout>
__device__ __forceinline__ void round_operands(nvcuda::wmma::fragment<Use, 16, 16, 8, nvcuda::wmma::precision::tf32, Layout>& f) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
}
template <class Fragment>
__device__ __forceinline__ void round_operands(Fragment&) {}

// T: the operands' element type in memory; OPERAND: the fragments' (T, or precision::tf32 for
// float); FRAG_K: the fragments' depth (16, or 8 for TF32).
template <class T, class OPERAND, int FRAG_K, bool TRANS_A, bool TRANS_B>
__device__ __forceinline__ void gemm_wmma_tile(int m, int n, int k, const T* __restrict__ a, const T* __restrict__ b,
                                               const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    using namespace nvcuda;
    __shared__ __align__(32) T as[WMMA_BM][WMMA_BK + WMMA_PAD];
    __shared__ __align__(32) T bs[WMMA_BK][WMMA_BN + WMMA_PAD];
    __shared__ __align__(32) float cs[WMMA_BM][WMMA_BN + 4];
    const int tid = threadIdx.x, warp = tid / 32;
    const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;
    const int m0 = blockIdx.y * WMMA_BM, n0 = blockIdx.x * WMMA_BN;
    wmma::fragment<wmma::accumulator, 16, 16, FRAG_K, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int k0 = 0; k0 < k; k0 += WMMA_BK) {
        // Unrolled by two only: unrolled fully (or by 4), the 32-bit TF32 staging spilled on
        // sm_90 (96 registers, 12 bytes of spill stores); by two it takes 80 and spills nothing.
#pragma unroll 2
        for (int idx = tid; idx < WMMA_BM * WMMA_BK; idx += WMMA_THREADS) {
            int row = TRANS_A ? idx % WMMA_BM : idx / WMMA_BK;
            int kk = TRANS_A ? idx / WMMA_BM : idx % WMMA_BK;
            int gi = m0 + row, gp = k0 + kk;
            T v = zero_of<T>();
            if (gi < m && gp < k) v = TRANS_A ? a[(long long)gp * m + gi] : a[(long long)gi * k + gp];
            as[row][kk] = v;
        }
#pragma unroll 2
        for (int idx = tid; idx < WMMA_BK * WMMA_BN; idx += WMMA_THREADS) {
            int col = TRANS_B ? idx / WMMA_BK : idx % WMMA_BN;
            int kk = TRANS_B ? idx % WMMA_BK : idx / WMMA_BN;
            int gj = n0 + col, gp = k0 + kk;
            T v = zero_of<T>();
            if (gj < n && gp < k) v = TRANS_B ? b[(long long)gj * k + gp] : b[(long long)gp * n + gj];
            bs[kk][col] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < WMMA_BK; kk += FRAG_K) {
            wmma::fragment<wmma::matrix_a, 16, 16, FRAG_K, OPERAND, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, FRAG_K, OPERAND, wmma::row_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                wmma::load_matrix_sync(fa[i], &as[warp_m + 16 * i][kk], WMMA_BK + WMMA_PAD);
                round_operands(fa[i]);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                wmma::load_matrix_sync(fb[j], &bs[kk][warp_n + 16 * j], WMMA_BN + WMMA_PAD);
                round_operands(fb[j]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&cs[warp_m + 16 * i][warp_n + 16 * j], acc[i][j], WMMA_BN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < WMMA_BM * WMMA_BN; idx += WMMA_THREADS) {
        int row = idx / WMMA_BN, col = idx % WMMA_BN;
        int gi = m0 + row, gj = n0 + col;
        if (gi >= m || gj >= n) continue;
        gemm_store(cs[row][col], gi, gj, n, bias, gelu, pre_gelu, c, beta);
    }
}

extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_f16_nn(int m, int n, int k, const __half* __restrict__ a,
                                                                        const __half* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__half, __half, 16, false, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_f16_nt(int m, int n, int k, const __half* __restrict__ a,
                                                                        const __half* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__half, __half, 16, false, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_f16_tn(int m, int n, int k, const __half* __restrict__ a,
                                                                        const __half* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__half, __half, 16, true, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_f16_tt(int m, int n, int k, const __half* __restrict__ a,
                                                                        const __half* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__half, __half, 16, true, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_bf16_nn(int m, int n, int k, const __nv_bfloat16* __restrict__ a,
                                                                        const __nv_bfloat16* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__nv_bfloat16, __nv_bfloat16, 16, false, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_bf16_nt(int m, int n, int k, const __nv_bfloat16* __restrict__ a,
                                                                        const __nv_bfloat16* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__nv_bfloat16, __nv_bfloat16, 16, false, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_bf16_tn(int m, int n, int k, const __nv_bfloat16* __restrict__ a,
                                                                        const __nv_bfloat16* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__nv_bfloat16, __nv_bfloat16, 16, true, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_bf16_tt(int m, int n, int k, const __nv_bfloat16* __restrict__ a,
                                                                        const __nv_bfloat16* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<__nv_bfloat16, __nv_bfloat16, 16, true, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_tf32_nn(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<float, nvcuda::wmma::precision::tf32, 8, false, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_tf32_nt(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<float, nvcuda::wmma::precision::tf32, 8, false, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_tf32_tn(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<float, nvcuda::wmma::precision::tf32, 8, true, false>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
extern "C" __global__ void __launch_bounds__(WMMA_THREADS) gemm_tf32_tt(int m, int n, int k, const float* __restrict__ a,
                                                                        const float* __restrict__ b, const float* __restrict__ bias,
    unsigned gelu, float* __restrict__ pre_gelu, float* __restrict__ c, float beta) {
    gemm_wmma_tile<float, nvcuda::wmma::precision::tf32, 8, true, true>(m, n, k, a, b, bias, gelu, pre_gelu, c, beta);
}
