// Emulator stand-in for CUDA's mma.h (nvcuda::wmma). CUDA leaves the mapping of fragment
// elements to lanes unspecified, so here every lane holds the whole tile; load, mma and store
// are warp-collective (every lane of the warp must call them from the same site), and a store
// writes each element from exactly one lane, as the hardware does.
#pragma once
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float to_float(float x) { return x; }
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    // Row-major, whatever the memory layout it was loaded from.
    T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
    ::emu::syncwarp(0xffffffffu, EMU_SITE);
    using F = fragment<Use, M, N, K, T, Layout>;
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c)
            f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, class T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
    ::emu::syncwarp(0xffffffffu, EMU_SITE);
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
    ::emu::syncwarp(0xffffffffu, EMU_SITE);
    for (int e = ::emu::lane_id(); e < M * N; e += 32) {
        int r = e / N, c = e % N;
        p[layout == mem_col_major ? c * ldm + r : r * ldm + c] = f.x[e];
    }
}

// d = a·b + c, accumulating in f32 in k order.
template <int M, int N, int K, class Ta, class La, class Tb, class Lb, class Tc>
void mma_sync(fragment<accumulator, M, N, K, Tc>& d, const fragment<matrix_a, M, N, K, Ta, La>& a,
              const fragment<matrix_b, M, N, K, Tb, Lb>& b, const fragment<accumulator, M, N, K, Tc>& c) {
    ::emu::syncwarp(0xffffffffu, EMU_SITE);
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float acc = c.x[i * N + j];
            for (int k = 0; k < K; ++k) acc += to_float(a.x[i * K + k]) * to_float(b.x[k * N + j]);
            d.x[i * N + j] = acc;
        }
}

}  // namespace wmma
}  // namespace nvcuda
