// Emulator stand-in for CUDA's mma.h (nvcuda::wmma). CUDA leaves the mapping of fragment
// elements to lanes unspecified, so here every lane holds the whole tile; load, mma and store
// are warp-collective (every lane of the warp must call them from the same site), and a store
// writes each element from exactly one lane, as the hardware does.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"

namespace nvcuda {
namespace wmma {

namespace precision {
// TF32 operands: stored as float, multiplied with a 10-bit mantissa (the kernel rounds them with
// __float_to_tf32 after loading, as CUDA requires).
struct tf32 {};
}  // namespace precision

// cvt.rna.tf32.f32: round to the nearest value with a 10-bit mantissa, ties away from zero; the
// low 13 bits of the result are zero.
inline float __float_to_tf32(float in) {
    std::uint32_t bits;
    std::memcpy(&bits, &in, 4);
    if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

template <class T>
struct storage_of {
    using type = T;
};
template <>
struct storage_of<precision::tf32> {
    using type = float;
};

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
    using element_type = typename storage_of<T>::type;
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    // Row-major, whatever the memory layout it was loaded from.
    element_type x[num_elements];
};

template <class Use, int M, int N, int K, class T, class Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f,
                   typename fragment<Use, M, N, K, T, Layout>::element_type value) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f,
                      const typename fragment<Use, M, N, K, T, Layout>::element_type* p, unsigned ldm) {
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
