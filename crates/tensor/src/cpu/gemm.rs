//! General matrix multiply: `C = op(A)·op(B) + beta·C (+ bias)`.
//!
//! `A` is logically `m×k` (stored `k×m` when `trans_a`), `B` is logically `k×n` (stored `n×k` when
//! `trans_b`). The transposed variants are what backward passes need: `dX = dY·W` and
//! `dW = dYᵀ·X` for a linear layer `Y = X·Wᵀ`.

use crate::cpu::simd::{dispatch, normal_cdf, Isa, Portable, Simd};
use crate::cpu::{as_f32, as_f32_mut};
use crate::{threads, Float};
use std::mem::MaybeUninit;
use std::ptr::null;

/// Operand layout of one GEMM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl GemmShape {
    #[inline]
    fn a_index(&self, i: usize, p: usize) -> usize {
        if self.trans_a {
            p * self.m + i
        } else {
            i * self.k + p
        }
    }

    #[inline]
    fn b_index(&self, p: usize, j: usize) -> usize {
        if self.trans_b {
            j * self.k + p
        } else {
            p * self.n + j
        }
    }
}

/// Plain triple loop, accumulating in the element type. The oracle for the fast kernels.
pub fn gemm_reference<F: Float>(s: GemmShape, a: &[F], b: &[F], c: &mut [F], beta: F) {
    assert_eq!(a.len(), s.m * s.k, "gemm: A has wrong length");
    assert_eq!(b.len(), s.k * s.n, "gemm: B has wrong length");
    assert_eq!(c.len(), s.m * s.n, "gemm: C has wrong length");
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = F::ZERO;
            for p in 0..s.k {
                acc += a[s.a_index(i, p)] * b[s.b_index(p, j)];
            }
            let out = &mut c[i * s.n + j];
            *out = if beta == F::ZERO {
                acc
            } else {
                beta * *out + acc
            };
        }
    }
}

/// `C = op(A)·op(B) + beta·C`, dispatching `f32` to the fast kernel.
pub fn gemm<F: Float>(s: GemmShape, a: &[F], b: &[F], c: &mut [F], beta: F) {
    gemm_with_bias(s, a, b, None, c, beta)
}

/// `C = op(A)·op(B) + beta·C + bias`, where `bias[j]` (length `n`) is added to every row: a
/// linear layer's bias, added as the first depth block is stored instead of in a pass of its own.
pub fn gemm_with_bias<F: Float>(
    s: GemmShape,
    a: &[F],
    b: &[F],
    bias: Option<&[F]>,
    c: &mut [F],
    beta: F,
) {
    if let Some(bias) = bias {
        assert_eq!(bias.len(), s.n, "gemm: bias has wrong length");
    }
    let bias32 = match bias {
        None => Some(None),
        Some(bias) => as_f32(bias).map(Some),
    };
    if let (Some(a32), Some(b32), Some(bias32)) = (as_f32(a), as_f32(b), bias32) {
        if let Some(c32) = as_f32_mut(c) {
            let beta = beta.to_f64() as f32;
            return gemm_with_isa(Isa::best(), s, a32, b32, bias32, c32, beta);
        }
    }
    match bias {
        // C starts as beta·C + bias; the product is then accumulated onto it.
        Some(bias) => {
            for row in c.chunks_mut(s.n) {
                for (x, &b) in row.iter_mut().zip(bias) {
                    *x = if beta == F::ZERO { b } else { beta * *x + b };
                }
            }
            gemm_reference(s, a, b, c, F::ONE)
        }
        None => gemm_reference(s, a, b, c, beta),
    }
}

/// `batch` independent GEMMs over consecutive `m×k`, `k×n`, `m×n` blocks.
pub fn gemm_batched<F: Float>(batch: usize, s: GemmShape, a: &[F], b: &[F], c: &mut [F], beta: F) {
    match (as_f32(a), as_f32(b), as_f32_mut(c)) {
        (Some(a), Some(b), Some(c)) => {
            gemm_batched_with_isa(Isa::best(), batch, s, a, b, c, beta.to_f64() as f32)
        }
        _ => {
            let (sa, sb, sc) = (s.m * s.k, s.k * s.n, s.m * s.n);
            for i in 0..batch {
                gemm_reference(
                    s,
                    &a[i * sa..(i + 1) * sa],
                    &b[i * sb..(i + 1) * sb],
                    &mut c[i * sc..(i + 1) * sc],
                    beta,
                );
            }
        }
    }
}

/// The fast `f32` [`gemm_with_bias`] on a given ISA, using [`threads::num_threads`] threads.
pub fn gemm_with_isa(
    isa: Isa,
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    c: &mut [f32],
    beta: f32,
) {
    check_operands(s, a, b, bias, c.len());
    isa.assert_supported();
    let ep = Epilogue {
        beta,
        bias,
        act: Activation::Identity,
    };
    let c = TilePtr(c.as_mut_ptr());
    // SAFETY: C holds m×n elements (checked above) and is ours alone for the call.
    unsafe { gemm_f32(isa, threads::num_threads(), s, a, b, c, ep) };
}

/// The fast `f32` GEMM on the calling thread alone: for kernels that call it from inside one
/// task of their own parallel loop (attention runs one head per task).
pub(crate) fn gemm_on_this_thread(
    isa: Isa,
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    beta: f32,
) {
    debug_assert_eq!(a.len(), s.m * s.k, "gemm: A has wrong length");
    debug_assert_eq!(b.len(), s.k * s.n, "gemm: B has wrong length");
    assert_eq!(c.len(), s.m * s.n, "gemm: C has wrong length");
    let c = TilePtr(c.as_mut_ptr());
    // SAFETY: C holds m×n elements (checked above) and is ours alone for the call.
    unsafe { gemm_f32(isa, 1, s, a, b, c, Epilogue::scale(beta)) };
}

/// [`gemm_batched`] on a given ISA. Small matrices are spread over threads one whole GEMM per
/// task; large ones run one after another, each using all threads.
pub fn gemm_batched_with_isa(
    isa: Isa,
    batch: usize,
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    beta: f32,
) {
    let (sa, sb, sc) = (s.m * s.k, s.k * s.n, s.m * s.n);
    assert_eq!(a.len(), batch * sa, "gemm_batched: A has wrong length");
    assert_eq!(b.len(), batch * sb, "gemm_batched: B has wrong length");
    assert_eq!(c.len(), batch * sc, "gemm_batched: C has wrong length");
    isa.assert_supported();
    let threads = threads::num_threads();
    if batch > 1 && threads > 1 && s.m * s.n * s.k < THREADED_MIN_WORK && sc > 0 {
        let items: Vec<_> = c.chunks_mut(sc).enumerate().collect();
        threads::parallel_each(items, |(i, c)| {
            let (a, b) = (&a[i * sa..(i + 1) * sa], &b[i * sb..(i + 1) * sb]);
            // SAFETY: each item is its own m×n block of C.
            unsafe {
                gemm_f32(
                    isa,
                    1,
                    s,
                    a,
                    b,
                    TilePtr(c.as_mut_ptr()),
                    Epilogue::scale(beta),
                )
            }
        });
    } else {
        for i in 0..batch {
            let c = TilePtr(c[i * sc..(i + 1) * sc].as_mut_ptr());
            let (a, b) = (&a[i * sa..(i + 1) * sa], &b[i * sb..(i + 1) * sb]);
            // SAFETY: an m×n block of C, ours alone for the call.
            unsafe { gemm_f32(isa, threads, s, a, b, c, Epilogue::scale(beta)) };
        }
    }
}

/// A function applied to each element of C as it is finally stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `x·Φ(x)`, the exact GELU (as [`crate::cpu::activation`] computes it).
    Gelu,
}

/// What C receives besides the product: `C = act(op(A)·op(B) + beta·C + bias)`, `bias[j]` in
/// every row. The bias is added when the first depth block is stored (later blocks accumulate
/// onto it), the activation when the last one is.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub(crate) beta: f32,
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) act: Activation,
}

impl<'a> Epilogue<'a> {
    fn scale(beta: f32) -> Self {
        Epilogue {
            beta,
            bias: None,
            act: Activation::Identity,
        }
    }

    /// The part of this epilogue that applies to the depth block at `pc` (of `kc`) of `k`.
    pub(crate) fn for_block(self, pc: usize, kc: usize, k: usize) -> Epilogue<'a> {
        let first = pc == 0;
        Epilogue {
            beta: if first { self.beta } else { 1.0 },
            bias: if first { self.bias } else { None },
            act: if pc + kc >= k {
                self.act
            } else {
                Activation::Identity
            },
        }
    }

    /// `*out = product + beta·*out + bias[j]` for one element of column `j`.
    ///
    /// # Safety
    /// `out` must be valid for writes, and for reads unless beta = 0 (then it is never read, so
    /// it may be uninitialised).
    #[inline(always)]
    pub(crate) unsafe fn store(&self, out: *mut f32, product: f32, j: usize) {
        // SAFETY: read only when beta ≠ 0, as the caller allows.
        let sum = if self.beta == 0.0 {
            product
        } else {
            self.beta * unsafe { *out } + product
        };
        let sum = match self.bias {
            Some(bias) => sum + bias[j],
            None => sum,
        };
        let sum = match self.act {
            Activation::Identity => sum,
            // The portable vector path's formula, one lane used.
            Activation::Gelu => {
                let v = Portable.splat(sum);
                Portable.mul(v, normal_cdf(Portable, v))[0]
            }
        };
        // SAFETY: the caller vouched for `out`.
        unsafe { *out = sum };
    }
}

/// Below this many multiply-adds a GEMM runs on one thread: waking workers would cost more.
pub(crate) const THREADED_MIN_WORK: usize = 1 << 18;
/// `x·Wᵀ` with at most this many rows of `x` and no packed `W` skips packing (see
/// [`direct_nt_body`]).
const DIRECT_NT_MAX_M: usize = 8;

/// Register tile and cache blocking of the packed path for one ISA. `MR×NR` is the micro-kernel's
/// tile of C (kept in registers); a `KC×NR` panel of B stays in L1 while the `MC×KC` block of A
/// streams from L2; the `KC×NC` block of B is shared by all `MC` blocks.
#[derive(Clone, Copy)]
pub(crate) struct Blocking {
    pub(crate) mr: usize,
    pub(crate) nr: usize,
    pub(crate) mc: usize,
    pub(crate) kc: usize,
    pub(crate) nc: usize,
}

/// The `KC×NR` B panel is reused by every A panel of the block and should stay in L1d; A's
/// `MC×KC` block (AVX-512: 336×384×4 B ≈ 500 KiB) sits in L2. KC trades that residency against
/// how often C is read and written back (once per KC of depth): on this 48 KiB-L1d machine a
/// 48 KiB B panel (KC = 384) measured 5–8 % faster at 1024³ than a 24 KiB one (KC = 192).
fn blocking(isa: Isa) -> Blocking {
    match isa {
        Isa::Avx512 => Blocking {
            mr: AVX512_MR,
            nr: AVX512_NV * 16,
            mc: AVX512_MR * 24,
            kc: 384,
            nc: 3072,
        },
        Isa::Avx2Fma => Blocking {
            mr: AVX2_MR,
            nr: AVX2_NV * 8,
            mc: AVX2_MR * 40,
            kc: 256,
            nc: 3072,
        },
        Isa::Portable => Blocking {
            mr: PORTABLE_MR,
            nr: PORTABLE_NV * 8,
            mc: PORTABLE_MR * 32,
            kc: 256,
            nc: 2048,
        },
    }
}

/// 14×32: 28 accumulators + 2 B vectors + 1 broadcast fill 31 of the 32 zmm registers.
const AVX512_MR: usize = 14;
const AVX512_NV: usize = 2;
/// 6×16: 12 accumulators + 2 B vectors + 1 broadcast fill 15 of the 16 ymm registers.
const AVX2_MR: usize = 6;
const AVX2_NV: usize = 2;
const PORTABLE_MR: usize = 4;
const PORTABLE_NV: usize = 2;
/// Scratch tile for edge blocks; at least the largest `MR×NR`.
const MAX_TILE: usize = 512;

/// The GEMM micro-kernel for one ISA's tile shape.
trait GemmKernel: Simd {
    /// A full `MR×NR` tile.
    ///
    /// # Safety
    /// As [`micro_kernel`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        self,
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        beta: f32,
        bias: *const f32,
        act: Activation,
    );

    /// The first `rows < MR` rows of a tile (at least; rounded up to a kernel size), written
    /// with `beta = 0` into `c` with row stride `ldc`: the last panel of a ragged `m` (with few
    /// rows, as in batch-1 inference, a full tile would mostly multiply padding).
    ///
    /// # Safety
    /// As [`micro_kernel`], with `c` valid for `MR` rows.
    unsafe fn partial_tile(
        self,
        rows: usize,
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
    );
}

/// [`GemmKernel::partial_tile`] for a kernel of `MR` rows: rows rounded up to 2, 4, 8 or `MR`.
///
/// # Safety
/// As [`GemmKernel::partial_tile`].
#[inline(always)]
unsafe fn partial_tile<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    rows: usize,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
) {
    let id = Activation::Identity;
    // SAFETY: the packed A panel is MR wide (zero-padded), so any row count up to MR is in it.
    unsafe {
        match rows {
            0..=2 if MR > 2 => micro_kernel::<S, 2, NV>(s, kc, a, MR, b, c, ldc, 0.0, null(), id),
            3..=4 if MR > 4 => micro_kernel::<S, 4, NV>(s, kc, a, MR, b, c, ldc, 0.0, null(), id),
            5..=8 if MR > 8 => micro_kernel::<S, 8, NV>(s, kc, a, MR, b, c, ldc, 0.0, null(), id),
            _ => micro_kernel::<S, MR, NV>(s, kc, a, MR, b, c, ldc, 0.0, null(), id),
        }
    }
}

/// Implements [`GemmKernel`] for an ISA with its `MR×(NV·LANES)` tile.
macro_rules! gemm_kernel {
    ($(#[$attr:meta])* $isa:ty, $mr:expr, $nv:expr) => {
        $(#[$attr])*
        impl GemmKernel for $isa {
            #[inline(always)]
            unsafe fn tile(
                self,
                kc: usize,
                a: *const f32,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
                beta: f32,
                bias: *const f32,
                act: Activation,
            ) {
                // SAFETY: forwarded from the caller.
                unsafe {
                    micro_kernel::<Self, { $mr }, { $nv }>(
                        self, kc, a, $mr, b, c, ldc, beta, bias, act,
                    )
                }
            }

            #[inline(always)]
            unsafe fn partial_tile(
                self,
                rows: usize,
                kc: usize,
                a: *const f32,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
            ) {
                // SAFETY: forwarded from the caller.
                unsafe { partial_tile::<Self, { $mr }, { $nv }>(self, rows, kc, a, b, c, ldc) }
            }
        }
    };
}

gemm_kernel!(
    #[cfg(target_arch = "x86_64")]
    crate::cpu::simd::Avx512,
    AVX512_MR,
    AVX512_NV
);
gemm_kernel!(
    #[cfg(target_arch = "x86_64")]
    crate::cpu::simd::Avx2,
    AVX2_MR,
    AVX2_NV
);
gemm_kernel!(Portable, PORTABLE_MR, PORTABLE_NV);
/// `C[..MR, ..NV·LANES] = act(A_panel·B_panel + beta·C + bias)` (beta = 0 overwrites, ignoring
/// what C held; a null `bias` adds nothing, otherwise it points to the tile's NR column biases).
/// `a` is a packed panel of `kc` steps, `a_stride ≥ MR` values per step (the first MR used), `b`
/// a packed `kc×NR` panel.
///
/// # Safety
/// `a` must hold `kc·a_stride` floats, `b` `kc·NR`, a non-null `bias` NR, and `c` must be valid for
/// an `MR×NR` tile with row stride `ldc`, not accessed by anyone else meanwhile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    kc: usize,
    a: *const f32,
    a_stride: usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    beta: f32,
    bias: *const f32,
    act: Activation,
) {
    let nr = NV * S::LANES;
    // C's tile is read and written only after the depth loop; fetching it now overlaps its
    // cache misses (rows `ldc` apart, often a page each) with the multiply-adds.
    for r in 0..MR {
        for v in 0..NV {
            prefetch(c.wrapping_add(r * ldc + v * S::LANES));
        }
    }
    let mut acc = [[s.zero(); NV]; MR];
    let mut bv = [s.zero(); NV];
    for p in 0..kc {
        // Past the panel's end this fetches the next panel, or nothing: only a hint.
        let ahead = b.wrapping_add((p + B_PREFETCH_STEPS) * nr);
        for line in (0..nr).step_by(CACHE_LINE_FLOATS) {
            prefetch(ahead.wrapping_add(line));
        }
        // SAFETY: p < kc, so every offset stays inside the panels.
        unsafe {
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = s.load_ptr(b.add(p * nr + v * S::LANES));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = s.splat(*a.add(p * a_stride + r));
                for v in 0..NV {
                    acc[v] = s.mul_add(av, bv[v], acc[v]);
                }
            }
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_tile(s, &acc, c, ldc, beta, bias, act) }
}

/// Stores an `MR×NV·LANES` tile of accumulated products as `C = act(acc + beta·C + bias)`: the
/// epilogue of every register-blocked micro-kernel (f32 and bf16).
///
/// # Safety
/// As [`micro_kernel`]: a non-null `bias` holds the tile's NV·LANES values, and `c` is valid for
/// the tile with row stride `ldc` (for reads too unless beta = 0).
#[inline(always)]
pub(crate) unsafe fn store_tile<S: Simd, const MR: usize, const NV: usize>(
    s: S,
    acc: &[[S::V; NV]; MR],
    c: *mut f32,
    ldc: usize,
    beta: f32,
    bias: *const f32,
    act: Activation,
) {
    let beta_v = s.splat(beta);
    // SAFETY: a non-null bias holds the tile's NR values.
    let bias_v: Option<[S::V; NV]> = (!bias.is_null()).then(|| {
        crate::cpu::simd::array_from_fn(|v| unsafe { s.load_ptr(bias.add(v * S::LANES)) })
    });
    for (r, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: inside the tile the caller vouched for.
            unsafe {
                let cp = c.add(r * ldc + v * S::LANES);
                let out = if beta == 0.0 {
                    acc
                } else {
                    s.mul_add(beta_v, s.load_ptr(cp), acc)
                };
                s.store_ptr(cp, finish(s, out, bias_v.map(|b| b[v]), act));
            }
        }
    }
}

/// `act(sum + bias)`, the epilogue's last steps on one vector of C.
#[inline(always)]
pub(crate) fn finish<S: Simd>(s: S, sum: S::V, bias: Option<S::V>, act: Activation) -> S::V {
    let out = match bias {
        Some(bias) => s.add(sum, bias),
        None => sum,
    };
    match act {
        Activation::Identity => out,
        Activation::Gelu => s.mul(out, normal_cdf(s, out)),
    }
}

/// Raw pointer to C's `m×n` elements, shared by tasks that write disjoint tiles of it. With
/// beta = 0, C may start uninitialised: each element is stored before anything reads it.
#[derive(Clone, Copy)]
pub(crate) struct TilePtr<T = f32>(pub(crate) *mut T);
// SAFETY: every task writes a disjoint set of C's elements (see `packed`/`direct_nt`), and the
// pointer does not outlive the buffer it came from (tasks finish before `parallel_for`
// returns).
unsafe impl<T> Send for TilePtr<T> {}
unsafe impl<T> Sync for TilePtr<T> {}

/// The f32 GEMM on `threads` threads, B read as given (`Raw`) or from its packing; A and B
/// already checked against `s`.
///
/// # Safety
/// `c` must be valid for `m×n` writes (and reads, unless beta = 0) that nothing else makes
/// during the call.
unsafe fn gemm_f32(
    isa: Isa,
    threads: usize,
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    c: TilePtr,
    ep: Epilogue<'_>,
) {
    // SAFETY: forwarded.
    unsafe { gemm_f32_from(isa, threads, s, a, BOperand::Raw(b), c, ep) }
}

/// [`gemm_f32`] with B given either way. A handful of rows against a raw `Bᵀ` take the direct
/// path, which reads B in place; a packed B always takes the packed path, whose micro-kernel
/// streams it with prefetching (at 1×8 tokens the direct path over a packed weight's raw copy
/// had made the MiniLM forward 3.8 ms against 1.6).
///
/// # Safety
/// As [`gemm_f32`]; a `Prepacked` B must match `s`.
pub(crate) unsafe fn gemm_f32_from(
    isa: Isa,
    threads: usize,
    s: GemmShape,
    a: &[f32],
    b: BOperand<'_>,
    c: TilePtr,
    ep: Epilogue<'_>,
) {
    if s.m == 0 || s.n == 0 {
        return;
    }
    if s.k == 0 {
        for i in 0..s.m {
            for j in 0..s.n {
                // SAFETY: inside C's m×n elements.
                unsafe { ep.store(c.0.add(i * s.n + j), 0.0, j) };
            }
        }
        return;
    }
    let threads = if s.m * s.n * s.k < THREADED_MIN_WORK {
        1
    } else {
        threads
    };
    match b {
        BOperand::Raw(raw) if !s.trans_a && s.trans_b && s.m <= DIRECT_NT_MAX_M => {
            // SAFETY: forwarded.
            unsafe { direct_nt(isa, threads, s, a, raw, c, ep) }
        }
        // SAFETY: forwarded.
        _ => unsafe { packed_f32(isa, threads, s, a, b, c, ep) },
    }
}

/// Splits `len` into `parts` ranges whose starts are multiples of `unit`.
pub(crate) fn split_range(
    len: usize,
    parts: usize,
    unit: usize,
    part: usize,
) -> std::ops::Range<usize> {
    let per = len.div_ceil(unit).div_ceil(parts) * unit;
    (part * per).min(len)..((part + 1) * per).min(len)
}

/// Picks a `tm×tn` grid of threads over C minimising the largest task: its multiply-adds (at
/// ~one vector FMA per cycle) plus the elements it packs (about one per cycle).
pub(crate) fn thread_grid(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    bl: Blocking,
) -> (usize, usize) {
    let lanes = (bl.nr / 2).max(1) as f64;
    let cost = |tm: usize, tn: usize| {
        let rows = m.div_ceil(bl.mr).div_ceil(tm) * bl.mr;
        let cols = n.div_ceil(bl.nr).div_ceil(tn) * bl.nr;
        let rows = rows.min(m) as f64;
        let cols = cols.min(n) as f64;
        let k = k as f64;
        rows * cols * k / lanes + (rows * cols.div_euclid(bl.nc as f64).max(1.0) + cols) * k
    };
    (1..=threads)
        .filter(|&tm| threads.is_multiple_of(tm))
        .map(|tm| (tm, threads / tm))
        .min_by(|&(am, an), &(bm, bn)| cost(am, an).total_cmp(&cost(bm, bn)))
        .unwrap_or((1, 1))
}

/// Where the packed path's `B` panels come from.
#[derive(Clone, Copy)]
pub(crate) enum BOperand<'a> {
    /// The caller's `B`, packed block by block into this thread's buffer as the loops reach it.
    Raw(&'a [f32]),
    /// Panels packed once in advance.
    Prepacked(&'a PackedB),
}

/// The packed (BLIS-style) path, with C split over a grid of threads.
///
/// # Safety
/// As [`gemm_f32`].
unsafe fn packed_f32(
    isa: Isa,
    threads: usize,
    s: GemmShape,
    a: &[f32],
    b: BOperand<'_>,
    c: TilePtr,
    ep: Epilogue<'_>,
) {
    let bl = blocking(isa);
    let (tm, tn) = thread_grid(threads, s.m, s.n, s.k, bl);
    threads::parallel_for(tm * tn, |task| {
        let rows = split_range(s.m, tm, bl.mr, task / tn);
        let cols = split_range(s.n, tn, bl.nr, task % tn);
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        with_pack_buffers(bl, |a_buf, b_buf| {
            dispatch!(isa, |simd,
                            s: GemmShape,
                            a: &[f32],
                            b: BOperand<'_>,
                            c: TilePtr,
                            ep: Epilogue<'_>,
                            rows: std::ops::Range<usize>,
                            cols: std::ops::Range<usize>,
                            bl: Blocking,
                            a_buf: &mut [f32],
                            b_buf: &mut [f32]|
             -> () {
                // SAFETY: `rows×cols` is this task's own block of C (tasks tile C disjointly),
                // which the caller lent us.
                unsafe { packed_block(simd, s, a, b, c, ep, rows, cols, bl, a_buf, b_buf) }
            })
        });
    });
}

/// `B` (logically `k×n`, stored `n×k` when `trans_b`) packed once into the panels the packed
/// path's micro-kernel reads, for a `B` that many calls share (a constant weight). Packing per
/// call reads all of `B` and writes it again with a strided transpose every time, which costs
/// more than the multiply itself when `A` has few rows (batch-1 inference).
pub struct PackedB {
    isa: Isa,
    k: usize,
    n: usize,
    trans_b: bool,
    /// Depth block starting at `pc` (a multiple of KC, `kc` deep): `n_padded·kc` floats from
    /// `pc·n_padded`, the NR-column panel holding column `j` at `(pc·n_padded) + j·kc`.
    data: CacheAligned,
}

impl PackedB {
    /// Packs `b` for [`gemm_prepacked`] on `isa`.
    pub fn new(isa: Isa, k: usize, n: usize, trans_b: bool, b: &[f32]) -> PackedB {
        assert_eq!(b.len(), k * n, "PackedB: B has wrong length");
        isa.assert_supported();
        let bl = blocking(isa);
        let n_padded = n.div_ceil(bl.nr) * bl.nr;
        let mut data = CacheAligned::zeroed(n_padded * k);
        let packed = data.as_mut_slice();
        let s = GemmShape {
            m: 0,
            n,
            k,
            trans_a: false,
            trans_b,
        };
        dispatch!(isa, |simd,
                        s: GemmShape,
                        b: &[f32],
                        packed: &mut [f32],
                        bl: Blocking,
                        n_padded: usize|
         -> () {
            for pc in (0..s.k).step_by(bl.kc) {
                let kc = bl.kc.min(s.k - pc);
                pack_b(
                    simd,
                    s,
                    b,
                    pc,
                    kc,
                    0,
                    s.n,
                    bl.nr,
                    &mut packed[pc * n_padded..],
                );
            }
        });
        PackedB {
            isa,
            k,
            n,
            trans_b,
            data,
        }
    }

    /// Packs a linear layer's `f32` weight `W` (`[out, in]`, used as `Wᵀ`) on the best ISA.
    pub fn for_linear(w: &[f32], out_features: usize, in_features: usize) -> PackedB {
        PackedB::new(Isa::best(), in_features, out_features, true, w)
    }

    /// Memory the packed panels hold.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }

    /// Depth (`k`) and columns (`n`) of the packed `B`.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `B(p, j)`, depth step `p` of column `j`, read back from its panel.
    pub fn value(&self, p: usize, j: usize) -> f32 {
        assert!(
            p < self.k && j < self.n,
            "PackedB: ({p}, {j}) outside {}×{}",
            self.k,
            self.n
        );
        let bl = blocking(self.isa);
        let pc = p - p % bl.kc;
        let kc = bl.kc.min(self.k - pc);
        let panel = j - j % bl.nr;
        self.block(pc, kc, panel)[(p - pc) * bl.nr + j % bl.nr]
    }

    /// Whether this packs the `B` of `s` (same sizes and layout).
    pub fn matches(&self, s: &GemmShape) -> bool {
        (self.k, self.n, self.trans_b) == (s.k, s.n, s.trans_b)
    }

    /// The `kc`-deep block at depth `pc`, from column `jc` (a multiple of NR) on.
    fn block(&self, pc: usize, kc: usize, jc: usize) -> &[f32] {
        let data = self.data.as_slice();
        let n_padded = data.len() / self.k.max(1);
        &data[pc * n_padded + jc * kc..]
    }
}

/// [`gemm_with_bias`] with `B` also given packed in advance: `f32` multiplies from the packed
/// panels (the kernel and order of [`gemm`]'s packed path, so the same result, except for at
/// most 8 rows against `Bᵀ`, which [`gemm`] computes directly from B and rounds differently);
/// other types, a transposed `A`, or a packing that does not match `s` take [`gemm_with_bias`].
pub fn gemm_prepacked<F: Float>(
    s: GemmShape,
    a: &[F],
    b: &[F],
    packed: &PackedB,
    bias: Option<&[F]>,
    c: &mut [F],
    beta: F,
) {
    let bias32 = match bias {
        None => Some(None),
        Some(bias) => as_f32(bias).map(Some),
    };
    let usable = packed.matches(&s) && !s.trans_a;
    if let (true, Some(a32), Some(b32), Some(bias32)) = (usable, as_f32(a), as_f32(b), bias32) {
        if let Some(c32) = as_f32_mut(c) {
            check_operands(s, a32, b32, bias32, c32.len());
            let c = TilePtr(c32.as_mut_ptr());
            let (b, ep) = (
                BOperand::Prepacked(packed),
                Epilogue {
                    beta: beta.to_f64() as f32,
                    bias: bias32,
                    act: Activation::Identity,
                },
            );
            // SAFETY: C holds m×n elements (checked) and is ours alone for the call.
            return unsafe { gemm_f32_from(packed.isa, threads::num_threads(), s, a32, b, c, ep) };
        }
    }
    gemm_with_bias(s, a, b, bias, c, beta)
}

/// `C = act(op(A)·op(B) + bias)` into an output that need not be initialised: a fresh buffer
/// would otherwise be zero-filled only to be overwritten, a pass over memory as long as the
/// product's own store (and the activation, applied to each tile as it is stored, saves another).
/// On return every element of `c` is initialised. `B` comes from `packed` when that matches `s`
/// (and `A` is not transposed).
pub fn gemm_into_uninit(
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    packed: Option<&PackedB>,
    bias: Option<&[f32]>,
    act: Activation,
    c: &mut [MaybeUninit<f32>],
) {
    check_operands(s, a, b, bias, c.len());
    let (isa, b) = match packed {
        Some(packed) if packed.matches(&s) && !s.trans_a => {
            (packed.isa, BOperand::Prepacked(packed))
        }
        _ => (Isa::best(), BOperand::Raw(b)),
    };
    let (c, ep) = (
        TilePtr(c.as_mut_ptr().cast()),
        Epilogue {
            beta: 0.0,
            bias,
            act,
        },
    );
    // SAFETY: C holds m×n elements (checked) and is ours alone for the call; with beta = 0 each
    // element is stored before anything reads it.
    unsafe { gemm_f32_from(isa, threads::num_threads(), s, a, b, c, ep) }
}

/// Panics unless the operands' lengths agree with `s`.
fn check_operands(s: GemmShape, a: &[f32], b: &[f32], bias: Option<&[f32]>, c_len: usize) {
    assert_eq!(a.len(), s.m * s.k, "gemm: A has wrong length");
    assert_eq!(b.len(), s.k * s.n, "gemm: B has wrong length");
    assert_eq!(c_len, s.m * s.n, "gemm: C has wrong length");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), s.n, "gemm: bias has wrong length");
    }
}

/// Elements (floats by default) starting on a 64-byte (cache-line) boundary. A packed panel is
/// read with full-width vector loads; off the boundary, every one of them straddles two lines
/// (malloc aligns only to 16 bytes, so a plain `Vec` lands on a boundary in one process and not
/// in the next).
pub(crate) struct CacheAligned<T = f32> {
    buf: Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Copy + Default> CacheAligned<T> {
    /// Elements of slack that let `start` reach a boundary.
    const SLACK: usize = CACHE_LINE_BYTES / std::mem::size_of::<T>();

    pub(crate) const fn new() -> CacheAligned<T> {
        CacheAligned {
            buf: Vec::new(),
            start: 0,
            len: 0,
        }
    }

    pub(crate) fn zeroed(len: usize) -> CacheAligned<T> {
        let mut aligned = CacheAligned::new();
        aligned.ensure(len);
        aligned
    }

    /// Makes the buffer at least `len` elements long. A fresh buffer is zeroed (`T::default()`);
    /// one that grows may be realigned, so it is scratch space: what it held is not kept in place.
    pub(crate) fn ensure(&mut self, len: usize) {
        if self.len < len {
            self.buf.resize(len + Self::SLACK, T::default());
            self.start = self
                .buf
                .as_ptr()
                .align_offset(CACHE_LINE_BYTES)
                .min(Self::SLACK);
            self.len = len;
        }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

thread_local! {
    /// Packing buffers, reused across calls on this thread.
    static PACK_BUFFERS: std::cell::RefCell<(CacheAligned, CacheAligned)> =
        const { std::cell::RefCell::new((CacheAligned::new(), CacheAligned::new())) };
}

/// Lends cache-aligned buffers for a packed `MC×KC` block of A and `KC×NC` block of B.
pub(crate) fn with_pack_buffers<R>(bl: Blocking, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let a_len = bl.mc.div_ceil(bl.mr) * bl.mr * bl.kc;
    let b_len = bl.nc.div_ceil(bl.nr) * bl.nr * bl.kc;
    let run = |(a, b): &mut (CacheAligned, CacheAligned)| {
        a.ensure(a_len);
        b.ensure(b_len);
        f(
            &mut a.as_mut_slice()[..a_len],
            &mut b.as_mut_slice()[..b_len],
        )
    };
    PACK_BUFFERS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut bufs) => run(&mut bufs),
        // Re-entered on this thread (cannot happen today, but stay correct if it does).
        Err(_) => run(&mut (CacheAligned::new(), CacheAligned::new())),
    })
}

/// Computes the `rows×cols` block of C: loops over NC columns, KC depth, MC rows, packing as it
/// goes, then the micro-kernel over every `MR×NR` tile.
///
/// # Safety
/// `c` must point to the caller's `m×n` C, of which this call may write exactly `rows×cols`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn packed_block<S: GemmKernel>(
    simd: S,
    s: GemmShape,
    a: &[f32],
    b: BOperand<'_>,
    c: TilePtr,
    ep: Epilogue<'_>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    bl: Blocking,
    a_buf: &mut [f32],
    b_buf: &mut [f32],
) {
    let (mr, nr) = (bl.mr, bl.nr);
    // Edge-tile scratch, stored by the kernel before it is read: zeroing it on every call
    // showed as 1.2% of the f32 train step (attention makes thousands of small products).
    let mut tile = [MaybeUninit::<f32>::uninit(); MAX_TILE];
    for jc in cols.clone().step_by(bl.nc) {
        let nc = bl.nc.min(cols.end - jc);
        for pc in (0..s.k).step_by(bl.kc) {
            let kc = bl.kc.min(s.k - pc);
            let b_block: &[f32] = match b {
                BOperand::Raw(b) => {
                    pack_b(simd, s, b, pc, kc, jc, nc, nr, b_buf);
                    b_buf
                }
                BOperand::Prepacked(packed) => packed.block(pc, kc, jc),
            };
            // Later depth blocks accumulate onto what the first one wrote.
            let ep = ep.for_block(pc, kc, s.k);
            for ic in rows.clone().step_by(bl.mc) {
                let mc = bl.mc.min(rows.end - ic);
                pack_a(simd, s, a, ic, mc, pc, kc, mr, a_buf);
                for jr in (0..nc).step_by(nr) {
                    let b_panel = b_block[jr * kc..].as_ptr();
                    for ir in (0..mc).step_by(mr) {
                        let a_panel = a_buf[ir * kc..].as_ptr();
                        let (tile_rows, tile_cols) = (mr.min(mc - ir), nr.min(nc - jr));
                        // SAFETY: (ic + ir, jc + jr) is inside rows×cols, which the caller owns.
                        let cp = unsafe { c.0.add((ic + ir) * s.n + jc + jr) };
                        if tile_rows == mr && tile_cols == nr {
                            let bias = ep.bias.map_or(null(), |b| b[jc + jr..].as_ptr());
                            // SAFETY: a full tile; the panels hold kc·mr and kc·nr floats, the
                            // bias (if any) the tile's nr columns.
                            unsafe {
                                simd.tile(kc, a_panel, b_panel, cp, s.n, ep.beta, bias, ep.act)
                            };
                        } else {
                            // SAFETY: `tile` holds mr·nr ≤ MAX_TILE floats with row stride nr.
                            unsafe {
                                let scratch = tile.as_mut_ptr().cast::<f32>();
                                simd.partial_tile(tile_rows, kc, a_panel, b_panel, scratch, nr)
                            };
                            for r in 0..tile_rows {
                                for j in 0..tile_cols {
                                    // SAFETY: r < tile_rows, j < tile_cols keeps us inside C's block,
                                    // and inside the rows the partial tile stored.
                                    unsafe {
                                        let value = tile[r * nr + j].assume_init();
                                        ep.store(cp.add(r * s.n + j), value, jc + jr + j)
                                    };
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Packs `A[ic..ic+mc, pc..pc+kc]` as `mr`-row panels, each `kc` steps of `mr` values, padding
/// missing rows with zeros.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_a<S: Simd>(
    simd: S,
    s: GemmShape,
    a: &[f32],
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
) {
    if s.trans_a {
        return pack_contiguous(simd, &a[pc * s.m + ic..], s.m, mc, mr, kc, dst);
    }
    for (panel, i0) in (0..mc).step_by(mr).enumerate() {
        let dst = &mut dst[panel * mr * kc..(panel + 1) * mr * kc];
        let rows = mr.min(mc - i0);
        pack_transposing(simd, &a[(ic + i0) * s.k + pc..], s.k, rows, mr, kc, dst);
    }
}

/// Packs `B[pc..pc+kc, jc..jc+nc]` as `nr`-column panels, each `kc` steps of `nr` values,
/// padding missing columns with zeros.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_b<S: Simd>(
    simd: S,
    s: GemmShape,
    b: &[f32],
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    nr: usize,
    dst: &mut [f32],
) {
    if !s.trans_b {
        return pack_contiguous(simd, &b[pc * s.n + jc..], s.n, nc, nr, kc, dst);
    }
    for (panel, j0) in (0..nc).step_by(nr).enumerate() {
        let dst = &mut dst[panel * nr * kc..(panel + 1) * nr * kc];
        let cols = nr.min(nc - j0);
        pack_transposing(simd, &b[(jc + j0) * s.k + pc..], s.k, cols, nr, kc, dst);
    }
}

/// Panels from lines that run along the step index: line `i` of step `p` is `src[p·stride + i]`,
/// `i < lines`; it lands in panel `i / width` at `p·width + i % width`, the last panel padded
/// with zeros. Each step's lines are read once, in order (one pass over a contiguous row; a
/// panel at a time would stride through memory `kc` times).
///
/// A panel narrower than a vector (AVX-512's 14-row panels of a transposed `A`) is read by
/// whole vectors wherever `src` goes on (the lanes past the panel are not stored): a masked
/// load streamed from memory at about half the rate on Zen 5, and the weight gradient's
/// `Aᵀ·B` (1536×384 over 4096 rows, one thread) went 138–149 → 176–178 GFLOP/s.
#[inline(always)]
fn pack_contiguous<S: Simd>(
    simd: S,
    src: &[f32],
    stride: usize,
    lines: usize,
    width: usize,
    kc: usize,
    dst: &mut [f32],
) {
    for p in 0..kc {
        let rest_of_src = &src[p * stride..];
        for (panel, i0) in (0..lines).step_by(width).enumerate() {
            let in_panel = lines.min(i0 + width) - i0;
            let dst = &mut dst[panel * width * kc + p * width..][..width];
            for i in (0..width).step_by(S::LANES) {
                let stored = (width - i).min(S::LANES);
                let line = i0 + i;
                let v = match rest_of_src.get(line..) {
                    Some(run) if in_panel >= i + stored && run.len() >= S::LANES => simd.load(run),
                    _ if in_panel > i => simd.load_or(&rest_of_src[line..i0 + in_panel], 0.0),
                    _ => simd.zero(),
                };
                simd.store_or(&mut dst[i..], v);
            }
        }
    }
}

/// How far ahead along each source row [`pack_transposing`] prefetches: four cache lines.
const PACK_PREFETCH_AHEAD: usize = 64;

/// How many depth steps ahead the micro-kernel prefetches its B panel (AVX-512: 64 steps of
/// 32 floats, 8 KiB). A weight packed once (batch-1 inference) streams from memory on every
/// call, and the hardware prefetchers did not stay far enough ahead of it: at 1×16 the kernel
/// waited on B's loads for 40 % of its time, and fetching ahead took the 2-thread forward from
/// 2.2 to 1.6 ms. Inside a packed block B is already in cache, and the hint cost nothing
/// measurable (1024³ GEMM, 32×128 forward and train step).
const B_PREFETCH_STEPS: usize = 64;

pub(crate) const CACHE_LINE_BYTES: usize = 64;
const CACHE_LINE_FLOATS: usize = CACHE_LINE_BYTES / std::mem::size_of::<f32>();

/// Hints that the cache line holding `x` will be read soon. Any address will do: a prefetch is
/// never dereferenced.
#[inline(always)]
pub(crate) fn prefetch<T>(x: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint; it never faults and changes no state we can observe.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(x.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// One panel from lines that run across the step index, transposed `LANES×LANES` blocks at a
/// time: `dst[p·width + i] = src[i·stride + p]` for `i < lines`, zero for `lines ≤ i < width`.
#[inline(always)]
pub(crate) fn pack_transposing<S: Simd>(
    simd: S,
    src: &[f32],
    stride: usize,
    lines: usize,
    width: usize,
    kc: usize,
    dst: &mut [f32],
) {
    assert!(dst.len() >= kc * width, "pack: panel buffer too small");
    assert!(
        lines == 0 || src.len() >= (lines - 1) * stride + kc,
        "pack: source too short"
    );
    let lanes = S::LANES;
    for i0 in (0..width).step_by(lanes) {
        let block_width = lanes.min(width - i0);
        let rows = lines.saturating_sub(i0).min(block_width);
        let whole_steps = kc - kc % lanes;
        for p in (0..whole_steps).step_by(lanes) {
            // Each source row is a separate stream starting at an arbitrary offset in its page:
            // the hardware prefetchers miss its first lines, and packing then waits on memory.
            if p + PACK_PREFETCH_AHEAD < kc {
                for i in 0..rows {
                    prefetch(&src[(i0 + i) * stride + p + PACK_PREFETCH_AHEAD]);
                }
            }
            // SAFETY: rows ≤ block_width ≤ LANES; the source rows i0.. read steps p..p+LANES ≤ kc
            // of lines < `lines` (checked above), the destination rows p..p+LANES < kc hold
            // `block_width` floats from column i0 within `width`.
            unsafe {
                simd.transpose_block(
                    src.as_ptr().add(i0 * stride + p),
                    stride,
                    rows,
                    dst.as_mut_ptr().add(p * width + i0),
                    width,
                    block_width,
                )
            };
        }
        for p in whole_steps..kc {
            for i in 0..block_width {
                dst[p * width + i0 + i] = if i < rows {
                    src[(i0 + i) * stride + p]
                } else {
                    0.0
                };
            }
        }
    }
}

/// `x·Wᵀ` for a handful of rows: every `C[i, j]` is a dot product of two contiguous rows, so
/// reading `W` in place beats packing it. Threads split the columns.
///
/// # Safety
/// As [`gemm_f32`].
unsafe fn direct_nt(
    isa: Isa,
    threads: usize,
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    c: TilePtr,
    ep: Epilogue<'_>,
) {
    const COLS_PER_TASK: usize = 64;
    let tasks = if threads > 1 {
        s.n.div_ceil(COLS_PER_TASK).min(threads * 4)
    } else {
        1
    };
    threads::parallel_for(tasks, |task| {
        let cols = split_range(s.n, tasks, 4, task);
        dispatch!(isa, |simd,
                        s: GemmShape,
                        a: &[f32],
                        b: &[f32],
                        c: TilePtr,
                        ep: Epilogue<'_>,
                        cols: std::ops::Range<usize>|
         -> () {
            // SAFETY: each task writes only its own columns of C.
            unsafe { direct_nt_body(simd, s, a, b, c, ep, cols) }
        });
    });
}

/// # Safety
/// `c` must point to the caller's `m×n` C, of which this call may write the columns `cols`.
#[inline(always)]
unsafe fn direct_nt_body<S: Simd>(
    simd: S,
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    c: TilePtr,
    ep: Epilogue<'_>,
    cols: std::ops::Range<usize>,
) {
    let mut i = 0;
    while i < s.m {
        // SAFETY: forwarded; each call covers rows i.. of the caller's columns.
        i += unsafe {
            match s.m - i {
                1 => direct_nt_rows::<S, 1>(simd, s, a, b, c, ep, i, cols.clone()),
                2 => direct_nt_rows::<S, 2>(simd, s, a, b, c, ep, i, cols.clone()),
                3 => direct_nt_rows::<S, 3>(simd, s, a, b, c, ep, i, cols.clone()),
                _ => direct_nt_rows::<S, 4>(simd, s, a, b, c, ep, i, cols.clone()),
            }
        };
    }
}

/// `R` rows of C from row `i0`, four columns at a time (the last group re-reads its final
/// column in the unused slots rather than branching). Returns `R`.
///
/// # Safety
/// As [`direct_nt_body`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn direct_nt_rows<S: Simd, const R: usize>(
    simd: S,
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    c: TilePtr,
    ep: Epilogue<'_>,
    i0: usize,
    cols: std::ops::Range<usize>,
) -> usize {
    let k = s.k;
    let a_rows: [&[f32]; R] = std::array::from_fn(|r| &a[(i0 + r) * k..(i0 + r + 1) * k]);
    for j0 in cols.clone().step_by(4) {
        let js: [usize; 4] = std::array::from_fn(|q| (j0 + q).min(cols.end - 1));
        let b_rows: [&[f32]; 4] = std::array::from_fn(|q| &b[js[q] * k..(js[q] + 1) * k]);
        let mut acc = [[simd.zero(); 4]; R];
        let mut p = 0;
        while p < k {
            let bv: [S::V; 4] = [
                simd.load_or(&b_rows[0][p..], 0.0),
                simd.load_or(&b_rows[1][p..], 0.0),
                simd.load_or(&b_rows[2][p..], 0.0),
                simd.load_or(&b_rows[3][p..], 0.0),
            ];
            for r in 0..R {
                let av = simd.load_or(&a_rows[r][p..], 0.0);
                for q in 0..4 {
                    acc[r][q] = simd.mul_add(av, bv[q], acc[r][q]);
                }
            }
            p += S::LANES;
        }
        for (r, acc) in acc.iter().enumerate() {
            for (q, &acc) in acc.iter().enumerate().take(cols.end - j0) {
                let dot = simd.reduce_sum(acc);
                // SAFETY: row i0 + r < m and column j0 + q is in this task's `cols`.
                unsafe { ep.store(c.0.add((i0 + r) * s.n + j0 + q), dot, j0 + q) };
            }
        }
    }
    R
}
