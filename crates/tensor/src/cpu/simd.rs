//! Instruction-set selection and the small vector vocabulary the fast kernels are written in.
//!
//! Kernels are written once, generic over [`Simd`], and instantiated per ISA inside a function
//! compiled with that ISA's target features (see [`dispatch!`]). A `Simd` value is a zero-sized
//! token that can only be created once the CPU is known to support its instructions, which is what
//! makes its methods safe to call.

use std::sync::OnceLock;

/// The instruction sets the fast kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512 F/BW/DQ/VL with FMA: 16 `f32` lanes, 32 registers.
    Avx512,
    /// AVX2 with FMA: 8 lanes, 16 registers.
    Avx2Fma,
    /// Plain Rust on 8-lane arrays; runs anywhere, whatever the compiler makes of it.
    Portable,
}

impl Isa {
    /// The fastest supported ISA, or the one named by `SCALPEL_ISA=avx512|avx2|portable` when it
    /// is supported (an unsupported or unknown request falls back to detection). The bf16 paths'
    /// names (`amx`, `avx512bf16`, see [`crate::cpu::gemm_bf16::Bf16Path`]) leave the f32
    /// kernels on AVX-512. Read once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let requested = std::env::var("SCALPEL_ISA")
                .ok()
                .and_then(|v| Isa::from_name(&v));
            requested
                .filter(|isa| isa.is_supported())
                .unwrap_or(Isa::available()[0])
        })
    }

    /// Every ISA this CPU can run, fastest first; always ends with `Portable`.
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "avx512" | "avx512bf16" | "amx" => Some(Isa::Avx512),
            "avx2" => Some(Isa::Avx2Fma),
            "portable" => Some(Isa::Portable),
            _ => None,
        }
    }

    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static DETECTED: OnceLock<(bool, bool)> = OnceLock::new();
            let (avx512, avx2) = *DETECTED.get_or_init(|| {
                let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
                let avx512 = avx2
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl");
                (avx512, avx2)
            });
            match self {
                Isa::Avx512 => avx512,
                Isa::Avx2Fma => avx2,
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// Panics unless this CPU supports `self`: the guard in front of every ISA-specific call.
    pub(crate) fn assert_supported(self) {
        assert!(self.is_supported(), "{self:?} is not supported on this CPU");
    }
}

/// Runs `$body` with `$s` bound to the token of `$isa`, inside a function compiled for that ISA,
/// so that the `#[inline(always)]` generic kernel it calls is instantiated with the right
/// instructions. The listed arguments are passed into that function by value.
///
/// ```ignore
/// dispatch!(isa, |s, x: &[f32], y: &mut [f32]| -> () gelu_body(s, x, y))
/// ```
macro_rules! dispatch {
    ($isa:expr, |$s:ident $(, $arg:ident : $ty:ty)* $(,)?| -> $ret:ty $body:block) => {{
        let isa: $crate::cpu::simd::Isa = $isa;
        isa.assert_supported();
        match isa {
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::simd::Isa::Avx512 => {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn run($($arg: $ty),*) -> $ret {
                    // SAFETY: only reached after `assert_supported` confirmed AVX-512.
                    let $s = unsafe { $crate::cpu::simd::Avx512::new_unchecked() };
                    $body
                }
                // SAFETY: AVX-512 support was asserted above.
                unsafe { run($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::simd::Isa::Avx2Fma => {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn run($($arg: $ty),*) -> $ret {
                    // SAFETY: only reached after `assert_supported` confirmed AVX2 and FMA.
                    let $s = unsafe { $crate::cpu::simd::Avx2::new_unchecked() };
                    $body
                }
                // SAFETY: AVX2 and FMA support was asserted above.
                unsafe { run($($arg),*) }
            }
            $crate::cpu::simd::Isa::Portable => {
                let $s = $crate::cpu::simd::Portable;
                $body
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("checked by assert_supported"),
        }
    }};
}
pub(crate) use dispatch;

/// A vector of `f32` lanes and the operations the kernels need. Methods are `#[inline(always)]`
/// so that they melt into the target-feature function the kernel is instantiated in.
///
/// `max(a, b)` is `a > b ? a : b` (x86 semantics): a NaN in `b` propagates.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    const LANES: usize;
    type V: Copy;

    fn splat(self, x: f32) -> Self::V;
    fn zero(self) -> Self::V {
        self.splat(0.0)
    }
    /// Reads `x[..LANES]`.
    fn load(self, x: &[f32]) -> Self::V;
    /// Writes `x[..LANES]`.
    fn store(self, x: &mut [f32], v: Self::V);
    /// Reads the `x.len() < LANES` leading lanes; the others are `fill`.
    fn load_partial(self, x: &[f32], fill: f32) -> Self::V;
    /// Writes the `x.len() < LANES` leading lanes.
    fn store_partial(self, x: &mut [f32], v: Self::V);
    /// # Safety
    /// `p` must be valid for reading `LANES` floats.
    unsafe fn load_ptr(self, p: *const f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing `LANES` floats.
    unsafe fn store_ptr(self, p: *mut f32, v: Self::V);

    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`, fused where the ISA has FMA.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    fn abs(self, a: Self::V) -> Self::V;
    /// Round to nearest, ties to even.
    fn round(self, a: Self::V) -> Self::V;
    /// `2^n` for integral `n` in `[-126, 127]`, built directly in the exponent bits.
    fn pow2i(self, n: Self::V) -> Self::V;
    /// Lane-wise `a < b ? t : f`.
    fn select_lt(self, a: Self::V, b: Self::V, t: Self::V, f: Self::V) -> Self::V;
    fn reduce_sum(self, v: Self::V) -> f32;
    fn reduce_max(self, v: Self::V) -> f32;

    /// Transposes one `LANES×LANES` block: source row `i < rows` is the `LANES` floats at
    /// `src + i·src_stride`; destination row `j` (`width` floats at `dst + j·dst_stride`) gets
    /// source column `j`, with zeros past `rows`. GEMM packing is made of these.
    ///
    /// # Safety
    /// `rows ≤ width ≤ LANES`; `src` must be valid for reading the `rows` source rows and `dst`
    /// for writing the `LANES` destination rows.
    #[inline(always)]
    unsafe fn transpose_block(
        self,
        src: *const f32,
        src_stride: usize,
        rows: usize,
        dst: *mut f32,
        dst_stride: usize,
        width: usize,
    ) {
        for j in 0..Self::LANES {
            for i in 0..width {
                // SAFETY: inside the rows the caller vouched for.
                unsafe {
                    *dst.add(j * dst_stride + i) = if i < rows {
                        *src.add(i * src_stride + j)
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    /// Loads `x[..LANES]`, or fewer lanes padded with `fill` at the end of a slice.
    #[inline(always)]
    fn load_or(self, x: &[f32], fill: f32) -> Self::V {
        if x.len() >= Self::LANES {
            self.load(x)
        } else {
            self.load_partial(x, fill)
        }
    }

    /// Stores into `x[..LANES]`, or into all of a shorter `x`.
    #[inline(always)]
    fn store_or(self, x: &mut [f32], v: Self::V) {
        if x.len() >= Self::LANES {
            self.store(x, v)
        } else {
            self.store_partial(x, v)
        }
    }
}

/// `[f(0), …, f(N − 1)]`, always inlined into the caller. The transposes build their vector
/// arrays with it: through `std::array::from_fn`, whose loop was not inlined into them, each
/// shuffle became a call of the intrinsic's own out-of-line copy (7% of the bf16 attention at
/// 32×128, in the packing of every head's operands).
#[inline(always)]
pub(crate) fn array_from_fn<T: Copy, const N: usize>(mut f: impl FnMut(usize) -> T) -> [T; N] {
    let mut out = [std::mem::MaybeUninit::<T>::uninit(); N];
    for (i, o) in out.iter_mut().enumerate() {
        o.write(f(i));
    }
    // SAFETY: every element was written above; `[MaybeUninit<T>; N]` has `[T; N]`'s layout.
    unsafe { std::ptr::from_ref(&out).cast::<[T; N]>().read() }
}

/// `out[i..i + LANES] = lanes(i)` for each vector step `i` of `out`, which need not be
/// initialised (a fresh output buffer): full vectors are stored through the pointer, the last
/// partial one through a stack tile.
#[inline(always)]
pub(crate) fn store_each_uninit<S: Simd>(
    s: S,
    out: &mut [std::mem::MaybeUninit<f32>],
    lanes: impl Fn(usize) -> S::V,
) {
    let full = out.len() / S::LANES * S::LANES;
    for i in (0..full).step_by(S::LANES) {
        // SAFETY: i + LANES ≤ full ≤ out.len(): the store stays inside `out`.
        unsafe { s.store_ptr(out.as_mut_ptr().add(i).cast(), lanes(i)) };
    }
    if full < out.len() {
        let mut tail = [0.0f32; MAX_LANES];
        let rest = out.len() - full;
        s.store_or(&mut tail[..rest], lanes(full));
        for (o, &t) in out[full..].iter_mut().zip(&tail) {
            o.write(t);
        }
    }
}

/// The widest vector any [`Simd`] has (AVX-512's 16 lanes).
const MAX_LANES: usize = 16;

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{array_from_fn, Simd};

    /// Token for AVX-512 (F, BW, DQ, VL) plus FMA.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(());

    impl Avx512 {
        /// # Safety
        /// The CPU must support AVX-512 F/BW/DQ/VL, AVX2 and FMA.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Self {
            Avx512(())
        }
    }

    /// Token for AVX2 plus FMA.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Self {
            Avx2(())
        }
    }

    // SAFETY (whole impl): an `Avx512` token exists only when the CPU supports the instructions,
    // and every pointer access below is bounds-checked against the slice or delegated to the
    // caller of an `unsafe fn`.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;

        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, x: &[f32]) -> __m512 {
            assert!(x.len() >= 16);
            unsafe { _mm512_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f32], v: __m512) {
            assert!(x.len() >= 16);
            unsafe { _mm512_storeu_ps(x.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_partial(self, x: &[f32], fill: f32) -> __m512 {
            let mask = (1u32 << x.len().min(16)).wrapping_sub(1) as u16;
            // Masked-off lanes are neither read nor faulted on.
            unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask, x.as_ptr()) }
        }
        #[inline(always)]
        fn store_partial(self, x: &mut [f32], v: __m512) {
            let mask = (1u32 << x.len().min(16)).wrapping_sub(1) as u16;
            unsafe { _mm512_mask_storeu_ps(x.as_mut_ptr(), mask, v) }
        }
        #[inline(always)]
        unsafe fn load_ptr(self, p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store_ptr(self, p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m512) -> __m512 {
            unsafe { _mm512_abs_ps(a) }
        }
        #[inline(always)]
        fn round(self, a: __m512) -> __m512 {
            unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
        }
        #[inline(always)]
        fn pow2i(self, n: __m512) -> __m512 {
            unsafe {
                let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
                _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
            }
        }
        #[inline(always)]
        fn select_lt(self, a: __m512, b: __m512, t: __m512, f: __m512) -> __m512 {
            unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), f, t) }
        }
        #[inline(always)]
        fn reduce_sum(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_add_ps(v) }
        }
        #[inline(always)]
        fn reduce_max(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_max_ps(v) }
        }
        /// Four shuffle stages: pairs of rows interleaved, then pairs of pairs (as 64-bit
        /// elements), then 128-bit lanes twice.
        #[inline(always)]
        unsafe fn transpose_block(
            self,
            src: *const f32,
            src_stride: usize,
            rows: usize,
            dst: *mut f32,
            dst_stride: usize,
            width: usize,
        ) {
            unsafe {
                let r: [__m512; 16] = array_from_fn(|i| {
                    if i < rows {
                        _mm512_loadu_ps(src.add(i * src_stride))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                // t[2g], t[2g+1]: rows 2g and 2g+1 interleaved, low and high halves of each lane.
                let t: [__m512d; 16] = array_from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    _mm512_castps_pd(if i % 2 == 0 {
                        _mm512_unpacklo_ps(a, b)
                    } else {
                        _mm512_unpackhi_ps(a, b)
                    })
                });
                // u[4g + c], lane L: column 4L + c, rows 4g..4g+4.
                let u: [__m512; 16] = array_from_fn(|i| {
                    let (g, c) = (i / 4, i % 4);
                    let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
                    _mm512_castpd_ps(if c % 2 == 0 {
                        _mm512_unpacklo_pd(a, b)
                    } else {
                        _mm512_unpackhi_pd(a, b)
                    })
                });
                // v[4h + c] (h: row groups 0-1 or 2-3, low or high lane pair).
                let v: [__m512; 16] = array_from_fn(|i| {
                    let (h, c) = (i / 4, i % 4);
                    let (a, b) = (u[8 * (h / 2) + c], u[8 * (h / 2) + 4 + c]);
                    if h % 2 == 0 {
                        _mm512_shuffle_f32x4::<0x44>(a, b)
                    } else {
                        _mm512_shuffle_f32x4::<0xEE>(a, b)
                    }
                });
                let mask = (1u32 << width).wrapping_sub(1) as u16;
                for j in 0..16 {
                    let (lane, c) = (j / 4, j % 4);
                    let (a, b) = (v[4 * (lane / 2) + c], v[8 + 4 * (lane / 2) + c]);
                    let col = if lane % 2 == 0 {
                        _mm512_shuffle_f32x4::<0x88>(a, b)
                    } else {
                        _mm512_shuffle_f32x4::<0xDD>(a, b)
                    };
                    _mm512_mask_storeu_ps(dst.add(j * dst_stride), mask, col);
                }
            }
        }
    }

    // SAFETY (whole impl): as for `Avx512`, with AVX2 and FMA.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;

        #[inline(always)]
        fn splat(self, x: f32) -> __m256 {
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, x: &[f32]) -> __m256 {
            assert!(x.len() >= 8);
            unsafe { _mm256_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn store(self, x: &mut [f32], v: __m256) {
            assert!(x.len() >= 8);
            unsafe { _mm256_storeu_ps(x.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn load_partial(self, x: &[f32], fill: f32) -> __m256 {
            let mut buf = [fill; 8];
            let n = x.len().min(8);
            buf[..n].copy_from_slice(&x[..n]);
            unsafe { _mm256_loadu_ps(buf.as_ptr()) }
        }
        #[inline(always)]
        fn store_partial(self, x: &mut [f32], v: __m256) {
            let mut buf = [0.0f32; 8];
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), v) };
            let n = x.len().min(8);
            x[..n].copy_from_slice(&buf[..n]);
        }
        #[inline(always)]
        unsafe fn load_ptr(self, p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store_ptr(self, p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn mul_add(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_min_ps(a, b) }
        }
        #[inline(always)]
        fn abs(self, a: __m256) -> __m256 {
            unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
        }
        #[inline(always)]
        fn round(self, a: __m256) -> __m256 {
            unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
        }
        #[inline(always)]
        fn pow2i(self, n: __m256) -> __m256 {
            unsafe {
                let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
                _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
            }
        }
        #[inline(always)]
        fn select_lt(self, a: __m256, b: __m256, t: __m256, f: __m256) -> __m256 {
            unsafe { _mm256_blendv_ps(f, t, _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)) }
        }
        #[inline(always)]
        fn reduce_sum(self, v: __m256) -> f32 {
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
            }
        }
        #[inline(always)]
        fn reduce_max(self, v: __m256) -> f32 {
            unsafe {
                let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
            }
        }
        /// Rows interleaved in pairs, then pairs of pairs, then 128-bit halves exchanged.
        #[inline(always)]
        unsafe fn transpose_block(
            self,
            src: *const f32,
            src_stride: usize,
            rows: usize,
            dst: *mut f32,
            dst_stride: usize,
            width: usize,
        ) {
            unsafe {
                let r: [__m256; 8] = array_from_fn(|i| {
                    if i < rows {
                        _mm256_loadu_ps(src.add(i * src_stride))
                    } else {
                        _mm256_setzero_ps()
                    }
                });
                let t: [__m256d; 8] = array_from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    _mm256_castps_pd(if i % 2 == 0 {
                        _mm256_unpacklo_ps(a, b)
                    } else {
                        _mm256_unpackhi_ps(a, b)
                    })
                });
                // u[4g + c], half L: column 4L + c, rows 4g..4g+4.
                let u: [__m256; 8] = array_from_fn(|i| {
                    let (g, c) = (i / 4, i % 4);
                    let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
                    _mm256_castpd_ps(if c % 2 == 0 {
                        _mm256_unpacklo_pd(a, b)
                    } else {
                        _mm256_unpackhi_pd(a, b)
                    })
                });
                let mask = _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(width as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                );
                for j in 0..8 {
                    let (a, b) = (u[j % 4], u[4 + j % 4]);
                    let col = if j < 4 {
                        _mm256_permute2f128_ps::<0x20>(a, b)
                    } else {
                        _mm256_permute2f128_ps::<0x31>(a, b)
                    };
                    _mm256_maskstore_ps(dst.add(j * dst_stride), mask, col);
                }
            }
        }
    }
}

/// Token for the portable path: 8-lane arrays the compiler may vectorise for the baseline ISA.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

type Lanes = [f32; 8];

#[inline(always)]
fn lanewise(a: Lanes, f: impl Fn(f32) -> f32) -> Lanes {
    a.map(f)
}

#[inline(always)]
fn lanewise2(a: Lanes, b: Lanes, f: impl Fn(f32, f32) -> f32) -> Lanes {
    std::array::from_fn(|i| f(a[i], b[i]))
}

impl Simd for Portable {
    const LANES: usize = 8;
    type V = Lanes;

    #[inline(always)]
    fn splat(self, x: f32) -> Lanes {
        [x; 8]
    }
    #[inline(always)]
    fn load(self, x: &[f32]) -> Lanes {
        x[..8].try_into().unwrap()
    }
    #[inline(always)]
    fn store(self, x: &mut [f32], v: Lanes) {
        x[..8].copy_from_slice(&v)
    }
    #[inline(always)]
    fn load_partial(self, x: &[f32], fill: f32) -> Lanes {
        std::array::from_fn(|i| x.get(i).copied().unwrap_or(fill))
    }
    #[inline(always)]
    fn store_partial(self, x: &mut [f32], v: Lanes) {
        let n = x.len().min(8);
        x[..n].copy_from_slice(&v[..n])
    }
    #[inline(always)]
    unsafe fn load_ptr(self, p: *const f32) -> Lanes {
        // SAFETY: the caller guarantees 8 readable floats at `p`.
        unsafe { p.cast::<Lanes>().read_unaligned() }
    }
    #[inline(always)]
    unsafe fn store_ptr(self, p: *mut f32, v: Lanes) {
        // SAFETY: the caller guarantees 8 writable floats at `p`.
        unsafe { p.cast::<Lanes>().write_unaligned(v) }
    }
    #[inline(always)]
    fn add(self, a: Lanes, b: Lanes) -> Lanes {
        lanewise2(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, a: Lanes, b: Lanes) -> Lanes {
        lanewise2(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, a: Lanes, b: Lanes) -> Lanes {
        lanewise2(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn div(self, a: Lanes, b: Lanes) -> Lanes {
        lanewise2(a, b, |x, y| x / y)
    }
    #[inline(always)]
    fn mul_add(self, a: Lanes, b: Lanes, c: Lanes) -> Lanes {
        // Unfused: a software `fmaf` would be far slower than the rounding it saves.
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn max(self, a: Lanes, b: Lanes) -> Lanes {
        lanewise2(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn min(self, a: Lanes, b: Lanes) -> Lanes {
        lanewise2(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn abs(self, a: Lanes) -> Lanes {
        lanewise(a, f32::abs)
    }
    #[inline(always)]
    fn round(self, a: Lanes) -> Lanes {
        lanewise(a, f32::round_ties_even)
    }
    #[inline(always)]
    fn pow2i(self, n: Lanes) -> Lanes {
        lanewise(n, |n| f32::from_bits(((n as i32 + 127) as u32) << 23))
    }
    #[inline(always)]
    fn select_lt(self, a: Lanes, b: Lanes, t: Lanes, f: Lanes) -> Lanes {
        std::array::from_fn(|i| if a[i] < b[i] { t[i] } else { f[i] })
    }
    #[inline(always)]
    fn reduce_sum(self, v: Lanes) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
    #[inline(always)]
    fn reduce_max(self, v: Lanes) -> f32 {
        v.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

/// Below this `exp` returns 0: `2^n` for `n = round(x·log₂e) < −126` has no normal encoding.
const EXP_MIN: f32 = -87.336_54;
/// `exp` is computed for arguments clamped to this (so `n ≤ 127`) and is `+∞` above `ln(f32::MAX)`.
const EXP_CLAMP_MAX: f32 = 88.0;
const EXP_OVERFLOW: f32 = 88.722_84;

/// `eˣ` to about 1 ulp on `[EXP_MIN, ln(f32::MAX)]`; 0 below (including `−∞`), `+∞` above, NaN
/// propagates. `x = n·ln2 + r` with `|r| ≤ ln2/2` (ln2 split in two so `r` is exact), then
/// `eʳ` by its degree-7 Taylor polynomial (truncation error < 1e-8 relative) times `2ⁿ`.
#[inline(always)]
pub(crate) fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = s.min(s.splat(EXP_CLAMP_MAX), s.max(s.splat(EXP_MIN), x));
    let n = s.round(s.mul(xc, s.splat(std::f32::consts::LOG2_E)));
    let r = s.mul_add(n, s.splat(-LN2_HI), xc);
    let r = s.mul_add(n, s.splat(-LN2_LO), r);
    let mut p = s.splat(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = s.mul_add(p, r, s.splat(c));
    }
    let y = s.mul(p, s.pow2i(n));
    let y = s.select_lt(x, s.splat(EXP_MIN), s.zero(), y);
    s.select_lt(s.splat(EXP_OVERFLOW), x, s.splat(f32::INFINITY), y)
}

/// `erf(z)/z` on `|z| ≤ 1` as a polynomial in `z²` (Chebyshev fit, relative error < 2e-9).
const ERF_SMALL: [f32; 7] = [
    7.875875e-05,
    -0.00080168643,
    0.0051890874,
    -0.026854212,
    0.11283594,
    -0.37612627,
    std::f32::consts::FRAC_2_SQRT_PI,
];
/// `erfc(a)·e^{a²}·(1 + a)` for `a ≥ 1` as a polynomial in `t = 1/(1 + a) ∈ (0, ½]`
/// (Chebyshev fit, relative error < 5e-9).
const ERFC_LARGE: [f32; 11] = [
    -6.180383,
    14.526453,
    -11.635357,
    1.4931195,
    2.5180256,
    -0.381805,
    -0.67328924,
    -0.2843413,
    0.28217173,
    0.5641886,
    0.5641896,
];

#[inline(always)]
fn horner<S: Simd>(s: S, coeffs: &[f32], x: S::V) -> S::V {
    let mut p = s.splat(coeffs[0]);
    for &c in &coeffs[1..] {
        p = s.mul_add(p, x, s.splat(c));
    }
    p
}

/// The standard normal CDF `Φ(x) = ½(1 + erf(x/√2))`, accurate in relative terms on both tails:
/// for `|z| > 1` the small tail is `½·erfc(|z|)` computed directly rather than as `1 + erf(z)`,
/// which would cancel. `e^{−z²}` uses `z² = hi + lo` (split with an FMA) so large `|z|` keeps
/// its precision.
#[inline(always)]
pub(crate) fn normal_cdf<S: Simd>(s: S, x: S::V) -> S::V {
    let z = s.mul(x, s.splat(std::f32::consts::FRAC_1_SQRT_2));
    let a = s.abs(z);
    let z2 = s.mul(z, z);
    let central = s.mul_add(
        s.mul(z, horner(s, &ERF_SMALL, z2)),
        s.splat(0.5),
        s.splat(0.5),
    );
    let z2_lo = s.mul_add(z, z, s.sub(s.zero(), z2));
    let t = s.div(s.splat(1.0), s.add(a, s.splat(1.0)));
    let gauss = s.mul(exp(s, s.sub(s.zero(), z2)), s.sub(s.splat(1.0), z2_lo));
    let tail = s.mul(
        s.mul(s.splat(0.5), gauss),
        s.mul(t, horner(s, &ERFC_LARGE, t)),
    );
    let far = s.select_lt(z, s.zero(), tail, s.sub(s.splat(1.0), tail));
    s.select_lt(a, s.splat(1.0), central, far)
}

/// `Σ a[i]·b[i]` over the common length.
#[inline(always)]
pub(crate) fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = s.zero();
    for i in (0..n).step_by(S::LANES) {
        acc = s.mul_add(s.load_or(&a[i..n], 0.0), s.load_or(&b[i..n], 0.0), acc);
    }
    s.reduce_sum(acc)
}

/// `y[i] += alpha·x[i]` over the common length.
#[inline(always)]
pub(crate) fn axpy<S: Simd>(s: S, alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let alpha = s.splat(alpha);
    for i in (0..n).step_by(S::LANES) {
        let out = s.mul_add(alpha, s.load_or(&x[i..n], 0.0), s.load_or(&y[i..n], 0.0));
        s.store_or(&mut y[i..n], out);
    }
}

/// `y[i] = alpha·x[i]` over the common length.
#[inline(always)]
pub(crate) fn scale_into<S: Simd>(s: S, alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let alpha = s.splat(alpha);
    for i in (0..n).step_by(S::LANES) {
        s.store_or(&mut y[i..n], s.mul(alpha, s.load_or(&x[i..n], 0.0)));
    }
}

/// `S::LANES` for a token whose type is not named at the call site (inside [`dispatch!`]).
#[inline(always)]
pub(crate) fn lanes<S: Simd>(_: S) -> usize {
    S::LANES
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every ISA's `transpose_block` against the definition, for each source row count and
    /// destination width, with strides wider than a block and sentinel-filled destinations so
    /// that a write outside the block shows.
    #[test]
    fn transpose_block_matches_its_definition() {
        const SENTINEL: f32 = -7.5;
        for isa in Isa::available() {
            dispatch!(isa, |s, isa: Isa| -> () {
                let lanes = lanes(s);
                let (src_stride, dst_stride) = (lanes + 3, lanes + 5);
                let src: Vec<f32> = (0..lanes * src_stride).map(|i| i as f32 + 1.0).collect();
                for width in 1..=lanes {
                    for rows in 0..=width {
                        let mut dst = vec![SENTINEL; lanes * dst_stride];
                        // SAFETY: the source holds `lanes` rows of `src_stride ≥ lanes` floats;
                        // the destination `lanes` rows of `dst_stride ≥ width` floats.
                        unsafe {
                            s.transpose_block(
                                src.as_ptr(),
                                src_stride,
                                rows,
                                dst.as_mut_ptr(),
                                dst_stride,
                                width,
                            )
                        };
                        for j in 0..lanes {
                            for i in 0..dst_stride {
                                let want = match i {
                                    i if i < rows => src[i * src_stride + j],
                                    i if i < width => 0.0,
                                    _ => SENTINEL,
                                };
                                let got = dst[j * dst_stride + i];
                                assert_eq!(
                                    got, want,
                                    "{isa:?} rows {rows} width {width} at ({j}, {i})"
                                );
                            }
                        }
                    }
                }
            });
        }
    }
}
