// CUDA-on-CPU shim: force-included (`-include shim.h`) into every kernel source compiled for the
// emulator, so that the very sources NVRTC compiles also run as host C++.
//
// Model: one block at a time, one fiber per CUDA thread (emu/runtime.cpp). The block's threads rendezvous at
// `__syncthreads` (a barrier that records the call site and reports threads arriving from
// different sites), warp operations exchange values through a per-warp buffer, atomics are
// `std::atomic_ref`. Shared memory is rewritten by build.rs (`__shared__` declarations become
// references to per-declaration storage, `extern __shared__` a pointer into the per-launch
// buffer); both are filled with 0xFF bytes (NaN for every float type) before each block so that
// reading shared memory nobody wrote shows up in the results.
#pragma once

#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
// CUDA's built-in vector type for 16-byte loads and stores (same size and alignment).
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

// Where a collective operation was called from: two threads of one barrier phase must agree.
struct Site {
    const char* file;
    int line;
};

void syncthreads(Site site);
// Warp collectives. `exchange` publishes `value` (up to 8 bytes) for the calling lane and
// returns lane `src`'s published bytes; lanes outside [0, 32) return the caller's own value.
void syncwarp(unsigned mask, Site site);
std::uint64_t exchange(unsigned mask, std::uint64_t value, int src, Site site);
unsigned ballot(unsigned mask, bool pred, Site site);
int lane_id();
void* dynamic_shared();
// Registers a `__shared__` variable's storage so that it is refilled before every block.
void register_static_shared(void* storage, std::size_t bytes);
[[noreturn]] void fail(const char* message);

template <class T, int Id>
T& static_shared() {
    alignas(128) static T storage;
    static const bool registered = (register_static_shared(&storage, sizeof(T)), true);
    (void)registered;
    return storage;
}

template <class T>
T shuffle(unsigned mask, T value, int src, Site site) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type over 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    bits = exchange(mask, bits, src, site);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

// Source lane of the shuffle variants, following CUDA's rules for `width` sub-groups: a source
// outside the caller's sub-group yields the caller's own value (encoded here as -1).
inline int shfl_src_idx(int lane, int src, int width) { return (lane / width) * width + (src % width); }
inline int shfl_src_xor(int lane, int mask, int width) {
    int src = lane ^ mask;
    return src / width > lane / width ? -1 : src;
}
inline int shfl_src_down(int lane, int delta, int width) {
    return (lane % width) + delta >= width ? -1 : lane + delta;
}
inline int shfl_src_up(int lane, int delta, int width) { return (lane % width) < delta ? -1 : lane - delta; }

// Kernel entry: reads each parameter from `args[i]` exactly as cuLaunchKernel does.
template <class... A, std::size_t... I>
void invoke_with(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
void invoke(void (*kernel)(A...), void** args) {
    invoke_with(kernel, args, std::index_sequence_for<A...>{});
}

struct KernelEntry {
    const char* name;
    void (*launch)(void** args);
};

}  // namespace emu

#define EMU_SITE (::emu::Site{__FILE__, __LINE__})
#define __syncthreads() ::emu::syncthreads(EMU_SITE)
#define __syncwarp(...) ::emu::syncwarp(EMU_SITE_MASK(__VA_ARGS__), EMU_SITE)
#define EMU_SITE_MASK(...) (0xffffffffu __VA_OPT__(&(__VA_ARGS__)))
#define __shfl_sync(mask, v, src, ...) \
    ::emu::shuffle(mask, v, ::emu::shfl_src_idx(::emu::lane_id(), src, EMU_WIDTH(__VA_ARGS__)), EMU_SITE)
#define __shfl_xor_sync(mask, v, lm, ...) \
    ::emu::shuffle(mask, v, ::emu::shfl_src_xor(::emu::lane_id(), lm, EMU_WIDTH(__VA_ARGS__)), EMU_SITE)
#define __shfl_down_sync(mask, v, d, ...) \
    ::emu::shuffle(mask, v, ::emu::shfl_src_down(::emu::lane_id(), d, EMU_WIDTH(__VA_ARGS__)), EMU_SITE)
#define __shfl_up_sync(mask, v, d, ...) \
    ::emu::shuffle(mask, v, ::emu::shfl_src_up(::emu::lane_id(), d, EMU_WIDTH(__VA_ARGS__)), EMU_SITE)
#define EMU_WIDTH(...) (32 __VA_OPT__(*0 + (__VA_ARGS__)))
#define __ballot_sync(mask, pred) ::emu::ballot(mask, (pred) != 0, EMU_SITE)
#define __all_sync(mask, pred) (::emu::ballot(mask, (pred) != 0, EMU_SITE) == ::emu::ballot(mask, true, EMU_SITE))
#define __any_sync(mask, pred) (::emu::ballot(mask, (pred) != 0, EMU_SITE) != 0u)

// Atomics: device memory is host memory here.
template <class T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

// Device math that host C++ lacks.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
using std::max;
using std::min;
