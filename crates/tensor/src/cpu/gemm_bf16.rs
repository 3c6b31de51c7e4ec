//! bf16 GEMM with f32 accumulation, for linear layers: `Y = act(X·Wᵀ + bias)`.
//!
//! `W` (`[n, k]`, a linear layer's `[out, in]` weight) is packed once into bf16 by
//! [`PackedBf16Weight::pack`]; `X` (`[rows, k]` f32 activations) is rounded to bf16 on every call
//! as it is converted for the kernel; products accumulate in f32 and the output is f32, through
//! the same epilogue as the f32 GEMM (bias, GELU). Three paths ([`Bf16Path`]):
//!
//! - **AMX** (`tdpbf16ps`): 2×2 blocks of 16×16 f32 C tiles, each step loading two 16×32 tiles of
//!   `X` (rounded into contiguous 1 KiB tiles) and two 16-pair tiles of `W`, so every tile
//!   loaded feeds two multiplies;
//! - **AVX512-BF16** (`vdpbf16ps`): a 14×32 register-blocked micro-kernel like the f32 one, each
//!   instruction a pair of depth steps;
//! - **f32**: the operands rounded to bf16 and multiplied by the f32 GEMM, for CPUs with neither
//!   (the same products; the weight is then held in f32).
//!
//! Both bf16 instruction paths read one weight layout: panels of 32 columns, each holding, for
//! every pair of depth steps `(2p, 2p+1)`, the 32 columns' pairs `[w(j, 2p), w(j, 2p+1)]` as one
//! 32-bit word ("VNNI" order): `vdpbf16ps` multiplies such a word of `X` (broadcast) by 16 of
//! them, and an AMX B tile is 16 such rows of 16 words (the panel read with a 128-byte stride).
//! The depth is padded with zeros to a multiple of 32 (one AMX tile row).
//!
//! Rounding is to nearest, ties to even. The bf16 instructions treat subnormal inputs as zero
//! (below 1.2e-38, far under anything a linear layer meets); the f32 path keeps them.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use crate::cpu::elementwise::BIAS_SUM_CHUNK_ROWS;
use crate::cpu::gemm::{
    self, Activation, BOperand, Blocking, CacheAligned, Epilogue, GemmShape, PackedB, TilePtr,
};
use crate::cpu::simd::Isa;
use crate::threads;

/// Columns per packed weight panel: the AVX512-BF16 kernel's two vectors of 16, and the two
/// 16-column B tiles of an AMX 2×2 block.
const PANEL_COLS: usize = 32;
/// The depth is padded to this: one AMX tile row of bf16 (64 bytes).
const K_ALIGN: usize = 32;

/// Which kernel a bf16 GEMM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bf16Path {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// Operands rounded to bf16, widened back and multiplied by the f32 GEMM on this ISA.
    F32(Isa),
}

impl Bf16Path {
    /// The fastest supported path, or the one `SCALPEL_ISA` names when it is supported: `amx`,
    /// `avx512bf16`, or an f32 ISA (`avx512`, `avx2`, `portable`: the f32 path on it). Read once.
    pub fn best() -> Bf16Path {
        static BEST: OnceLock<Bf16Path> = OnceLock::new();
        *BEST.get_or_init(|| {
            std::env::var("SCALPEL_ISA")
                .ok()
                .and_then(|v| Bf16Path::from_name(&v))
                .filter(|path| path.is_supported())
                .unwrap_or(Bf16Path::available()[0])
        })
    }

    /// Every path this CPU can run, fastest first; always ends with the f32 path on
    /// [`Isa::best`].
    pub fn available() -> Vec<Bf16Path> {
        [
            Bf16Path::Amx,
            Bf16Path::Avx512Bf16,
            Bf16Path::F32(Isa::best()),
        ]
        .into_iter()
        .filter(|path| path.is_supported())
        .collect()
    }

    pub fn from_name(name: &str) -> Option<Bf16Path> {
        match name.trim().to_ascii_lowercase().as_str() {
            "amx" => Some(Bf16Path::Amx),
            "avx512bf16" => Some(Bf16Path::Avx512Bf16),
            other => Isa::from_name(other).map(Bf16Path::F32),
        }
    }

    pub fn is_supported(self) -> bool {
        match self {
            Bf16Path::Amx => amx_usable(),
            Bf16Path::Avx512Bf16 => avx512bf16_detected(),
            Bf16Path::F32(isa) => isa.is_supported(),
        }
    }

    /// What CPUID says this CPU has, whether or not the OS lets us use it: the paths a test must
    /// be able to run.
    pub fn advertised() -> Vec<Bf16Path> {
        let mut paths = Vec::new();
        if amx_bf16_advertised() {
            paths.push(Bf16Path::Amx);
        }
        if avx512bf16_detected() {
            paths.push(Bf16Path::Avx512Bf16);
        }
        paths.push(Bf16Path::F32(Isa::best()));
        paths
    }

    pub(crate) fn assert_supported(self) {
        assert!(self.is_supported(), "{self:?} is not supported on this CPU");
    }
}

fn avx512bf16_detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Isa::Avx512.is_supported() && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// CPUID leaf 7 EDX bits 22 (AMX-BF16) and 24 (AMX-TILE): `is_x86_feature_detected!` does not
/// know them on stable Rust.
fn amx_bf16_advertised() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only if the CPU has it.
        let edx = unsafe {
            if __get_cpuid_max(0).0 < 7 {
                return false;
            }
            __cpuid_count(7, 0).edx
        };
        avx512bf16_detected() && edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AMX is advertised and Linux granted this process the tile data state, requested once with
/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: until then the first tile instruction
/// would kill the process with SIGILL. The grant is per process; each thread's first tile
/// instruction then traps once while the kernel allocates its ~8 KB of tile state (the pool's
/// threads live for the whole process, so that happens once per thread).
fn amx_usable() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| amx_bf16_advertised() && request_tile_data())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: arch_prctl with these arguments only changes which state components this process
    // may use; it reads and writes no memory of ours. `syscall` clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_data() -> bool {
    false
}

/// A value a weight can be packed from: `f32` (rounded to nearest even) or `bf16` (as is).
pub trait Bf16Operand: Copy {
    fn to_bf16(self) -> bf16;

    /// `values` as `f32`, if they are (the vector packer's input).
    fn as_f32(_values: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Bf16Operand for f32 {
    #[inline]
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }

    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
}

impl Bf16Operand for bf16 {
    #[inline]
    fn to_bf16(self) -> bf16 {
        self
    }
}

/// A linear layer's weight `W` (`[n, k]` row-major: `n` outputs, `k` inputs, used as `Wᵀ`)
/// rounded to bf16 and packed once for one [`Bf16Path`]: a weight that many calls share.
///
/// ```ignore
/// let packed = PackedBf16Weight::pack(Bf16Path::best(), &w, out_features, in_features);
/// gemm_bf16_packed(&x, rows, &packed, Some(&bias), Activation::Gelu, &mut y);
/// ```
pub struct PackedBf16Weight {
    path: Bf16Path,
    n: usize,
    k: usize,
    data: PackedData,
}

enum PackedData {
    /// `[panel][k_padded / 2][PANEL_COLS]` words, each the bf16 pair `w(j, 2p)` (low half),
    /// `w(j, 2p + 1)` (high half); zeros past `n` and `k`.
    Vnni(CacheAligned<u32>),
    /// The rounded weight, widened to f32 and packed for the f32 GEMM.
    F32(PackedB),
}

impl PackedBf16Weight {
    /// Rounds `w` (`[n, k]`) to bf16 and packs it for `path`.
    pub fn pack<T: Bf16Operand>(path: Bf16Path, w: &[T], n: usize, k: usize) -> PackedBf16Weight {
        assert_eq!(w.len(), n * k, "PackedBf16Weight: W has wrong length");
        PackedBf16Weight::pack_from(path, n, k, false, w)
    }

    /// Rounds `w_t` (`[k, n]`: the weight stored transposed) to bf16 and packs it as
    /// [`PackedBf16Weight::pack`] packs its transpose. A linear layer's input gradient
    /// `dX = dY·W` is `dY·(Wᵀ)ᵀ`: its weight is the layer's `[out, in]` weight read this way,
    /// with `n = in` and `k = out`.
    pub fn pack_transposed<T: Bf16Operand>(
        path: Bf16Path,
        w_t: &[T],
        n: usize,
        k: usize,
    ) -> PackedBf16Weight {
        assert_eq!(w_t.len(), n * k, "PackedBf16Weight: Wᵀ has wrong length");
        PackedBf16Weight::pack_from(path, n, k, true, w_t)
    }

    /// `w(j, p)` is `src[j·k + p]`, or `src[p·n + j]` when `transposed`.
    fn pack_from<T: Bf16Operand>(
        path: Bf16Path,
        n: usize,
        k: usize,
        transposed: bool,
        src: &[T],
    ) -> PackedBf16Weight {
        path.assert_supported();
        let data = match path {
            Bf16Path::F32(isa) => {
                let rounded: Vec<f32> = src.iter().map(|v| v.to_bf16().to_f32()).collect();
                PackedData::F32(PackedB::new(isa, k, n, !transposed, &rounded))
            }
            Bf16Path::Amx | Bf16Path::Avx512Bf16 => {
                let pairs = k.next_multiple_of(K_ALIGN) / 2;
                let panels = n.div_ceil(PANEL_COLS);
                let mut data = CacheAligned::<u32>::zeroed(panels * pairs * PANEL_COLS);
                let packed = data.as_mut_slice();
                let bits = |j: usize, p: usize| {
                    if p >= k {
                        0
                    } else if transposed {
                        u32::from(src[p * n + j].to_bf16().to_bits())
                    } else {
                        u32::from(src[j * k + p].to_bf16().to_bits())
                    }
                };
                let word = |j: usize, p: usize| bits(j, 2 * p) | (bits(j, 2 * p + 1) << 16);
                if let Some(src) = T::as_f32(src).filter(|_| transposed) {
                    // Each pair of source rows is one run of panel words (16 at a time).
                    let width = panels * PANEL_COLS;
                    let offset = |p, j0| panel_word(pairs, p, j0);
                    let src = Bf16Input::F32(src);
                    interleave_row_pairs(src, k, n, width, pairs, packed, offset, None);
                } else if let Some(src) = T::as_f32(src) {
                    // SAFETY: these paths exist only where AVX512-BF16 was detected.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        x86::pack_row_pairs(src, n, k, pairs, packed)
                    };
                    #[cfg(not(target_arch = "x86_64"))]
                    unreachable!("no bf16 instructions: {:?}", (src, packed));
                } else if transposed {
                    // Columns innermost: both source rows and the panel's words are read and
                    // written in order.
                    for p in 0..k.div_ceil(2) {
                        for j in 0..n {
                            let (panel, col) = (j / PANEL_COLS, j % PANEL_COLS);
                            packed[(panel * pairs + p) * PANEL_COLS + col] = word(j, p);
                        }
                    }
                } else {
                    for j in 0..n {
                        let (panel, col) = (j / PANEL_COLS, j % PANEL_COLS);
                        for p in 0..k.div_ceil(2) {
                            packed[(panel * pairs + p) * PANEL_COLS + col] = word(j, p);
                        }
                    }
                }
                PackedData::Vnni(data)
            }
        };
        PackedBf16Weight { path, n, k, data }
    }

    pub fn path(&self) -> Bf16Path {
        self.path
    }

    /// Outputs (`n`) and inputs (`k`).
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `W` (`[n, k]`) as it was rounded: the packing read back.
    pub fn unpack(&self) -> Vec<bf16> {
        let (n, k) = (self.n, self.k);
        match &self.data {
            PackedData::F32(b) => (0..n * k)
                .map(|i| bf16::from_f32(b.value(i % k, i / k)))
                .collect(),
            PackedData::Vnni(words) => {
                let (words, pairs) = (words.as_slice(), k.next_multiple_of(K_ALIGN) / 2);
                (0..n * k)
                    .map(|i| {
                        let (j, p) = (i / k, i % k);
                        let word =
                            words[((j / PANEL_COLS) * pairs + p / 2) * PANEL_COLS + j % PANEL_COLS];
                        bf16::from_bits((word >> (16 * (p % 2))) as u16)
                    })
                    .collect()
            }
        }
    }

    /// Memory the packed weight holds.
    pub fn bytes(&self) -> usize {
        match &self.data {
            PackedData::Vnni(data) => std::mem::size_of_val(data.as_slice()),
            PackedData::F32(packed) => packed.bytes(),
        }
    }
}

/// The activations `X` of a bf16 GEMM: f32, rounded to bf16 as the kernel reads them, or bf16
/// already (the rounded output of an earlier GEMM, or one rounding shared by several GEMMs of
/// the same input): the same bits either way.
#[derive(Clone, Copy, Debug)]
pub enum Bf16Input<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Bf16Input<'a> {
    pub fn len(self) -> usize {
        match self {
            Bf16Input::F32(v) => v.len(),
            Bf16Input::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// Elements `range` (clipped to the end: a row past it is empty, and reads as zeros).
    fn slice(self, range: Range<usize>) -> Bf16Input<'a> {
        let clip = |len: usize| range.start.min(len)..range.end.min(len);
        match self {
            Bf16Input::F32(v) => Bf16Input::F32(&v[clip(v.len())]),
            Bf16Input::Bf16(v) => Bf16Input::Bf16(&v[clip(v.len())]),
        }
    }

    /// The values rounded to bf16 and widened back to f32 (the f32 path's operand).
    fn rounded_f32(self) -> Vec<f32> {
        match self {
            Bf16Input::F32(v) => v.iter().map(|v| v.to_bf16().to_f32()).collect(),
            Bf16Input::Bf16(v) => v.iter().map(|v| v.to_f32()).collect(),
        }
    }
}

/// Where a bf16 GEMM stores `act(X·Wᵀ + bias)` (need not be initialised: on return every
/// element is): f32, or rounded to bf16 for a consumer that would round it anyway (the next
/// bf16 GEMM), in half the bytes. The AMX kernel rounds as it stores, and so does the
/// AVX512-BF16 one when the depth is one block; otherwise the f32 output is rounded after.
pub enum Bf16Output<'a> {
    F32(&'a mut [MaybeUninit<f32>]),
    Bf16(&'a mut [MaybeUninit<bf16>]),
}

impl Bf16Output<'_> {
    fn len(&self) -> usize {
        match self {
            Bf16Output::F32(v) => v.len(),
            Bf16Output::Bf16(v) => v.len(),
        }
    }

    fn ptr(&mut self) -> CPtr {
        match self {
            Bf16Output::F32(v) => CPtr::F32(TilePtr(v.as_mut_ptr().cast())),
            Bf16Output::Bf16(v) => CPtr::Bf16(TilePtr(v.as_mut_ptr().cast())),
        }
    }
}

/// Whether `path`'s kernel stores a bf16 C itself, rounding as it stores, at depth `k`: AMX
/// always (its C tiles wait in f32 between depth blocks), AVX512-BF16 when the depth is one
/// block (its C is where it accumulates across blocks). Otherwise the f32 output is rounded
/// after, in a pass of its own.
fn stores_bf16(path: Bf16Path, k: usize) -> bool {
    match path {
        Bf16Path::Amx => k > 0,
        Bf16Path::Avx512Bf16 => k > 0 && k.next_multiple_of(K_ALIGN) <= blocking(path).kc,
        Bf16Path::F32(_) => false,
    }
}

/// C of a bf16 instruction path: f32, or bf16 bits (where [`stores_bf16`]).
#[derive(Clone, Copy)]
enum CPtr {
    F32(TilePtr),
    Bf16(TilePtr<u16>),
}

impl CPtr {
    /// The element `i` places further on.
    ///
    /// # Safety
    /// The result must stay inside the caller's C.
    unsafe fn add(self, i: usize) -> CPtr {
        // SAFETY: as the caller vouched.
        unsafe {
            match self {
                CPtr::F32(c) => CPtr::F32(TilePtr(c.0.add(i))),
                CPtr::Bf16(c) => CPtr::Bf16(TilePtr(c.0.add(i))),
            }
        }
    }
}

/// `out = act(X·Wᵀ + bias)` with `X` (`[rows, k]`, f32) rounded to bf16, `W` from `packed`
/// (`[n, k]`), f32 accumulation and output (`[rows, n]`), `bias` (length `n`) added to every row;
/// on [`threads::num_threads`] threads, on the path `packed` was packed for.
pub fn gemm_bf16_packed(
    x: &[f32],
    rows: usize,
    packed: &PackedBf16Weight,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
) {
    // SAFETY: `MaybeUninit<f32>` has f32's layout, and the callee stores only initialised f32s.
    let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
    gemm_bf16_into_uninit(
        Bf16Input::F32(x),
        rows,
        packed,
        bias,
        act,
        Bf16Output::F32(out),
    )
}

/// [`gemm_bf16_packed`] from f32 or bf16 activations, into an f32 or bf16 output that need not
/// be initialised (a fresh buffer): on return every element is.
pub fn gemm_bf16_into_uninit(
    x: Bf16Input<'_>,
    rows: usize,
    packed: &PackedBf16Weight,
    bias: Option<&[f32]>,
    act: Activation,
    mut out: Bf16Output<'_>,
) {
    let (n, k) = (packed.n, packed.k);
    assert_eq!(x.len(), rows * k, "gemm_bf16: X has wrong length");
    assert_eq!(out.len(), rows * n, "gemm_bf16: output has wrong length");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "gemm_bf16: bias has wrong length");
    }
    let ep = Epilogue {
        beta: 0.0,
        bias,
        act,
    };
    if rows == 0 || n == 0 {
        return;
    }
    if let Bf16Output::Bf16(dst) = &mut out {
        if !stores_bf16(packed.path, k) {
            let mut y = Vec::with_capacity(rows * n);
            let uninit = &mut y.spare_capacity_mut()[..rows * n];
            gemm_bf16_into_uninit(x, rows, packed, bias, act, Bf16Output::F32(uninit));
            // SAFETY: the call above initialised all rows·n elements.
            unsafe { y.set_len(rows * n) };
            return round_into(&y, dst);
        }
    }
    let threads = if rows * n * k < gemm::THREADED_MIN_WORK {
        1
    } else {
        threads::num_threads()
    };
    let c = out.ptr();
    match &packed.data {
        PackedData::F32(b) => {
            let (Bf16Path::F32(isa), CPtr::F32(c)) = (packed.path, c) else {
                unreachable!("an f32 packing belongs to the f32 path, which stores f32")
            };
            let s = GemmShape {
                m: rows,
                n,
                k,
                trans_a: false,
                trans_b: true,
            };
            let rounded = x.rounded_f32();
            // SAFETY: C holds rows×n elements (checked) and is ours alone for the call; with
            // beta = 0 each is stored before anything reads it.
            unsafe { gemm::gemm_f32_from(isa, threads, s, &rounded, BOperand::Prepacked(b), c, ep) }
        }
        PackedData::Vnni(_) if k == 0 => {
            let CPtr::F32(c) = c else {
                unreachable!("a bf16 output of no depth is rounded from an f32 one")
            };
            for i in 0..rows * n {
                // SAFETY: inside C's rows×n elements.
                unsafe { ep.store(c.0.add(i), 0.0, i % n) };
            }
        }
        PackedData::Vnni(w) => {
            let k_padded = k.next_multiple_of(K_ALIGN);
            let g = VnniGemm {
                x: XOperand::Rows(x, k),
                w: w.as_slice(),
                n,
                k_padded,
                c,
                ep,
            };
            if packed.path != Bf16Path::Amx {
                // SAFETY: C as the caller lent it; X's rows are rounded as they are packed.
                return unsafe { run_vnni(packed.path, threads, g, rows, k) };
            }
            // bf16 rows a whole number of tile rows wide are AMX tiles as they lie (a row
            // stride of 2k bytes) for every full 32-row block; the rest is rounded or copied
            // into zero-padded tiles.
            let full_blocks = rows / AMX_BLOCK_ROWS * AMX_BLOCK_ROWS;
            let in_place = match x {
                Bf16Input::Bf16(bits) if k == k_padded && full_blocks > 0 => {
                    let g = VnniGemm {
                        x: XOperand::AmxTiles(AmxX::rows(bytemuck::cast_slice(bits), k)),
                        ..g
                    };
                    // SAFETY: the first `full_blocks` rows are whole 32-row blocks of X; C as
                    // the caller lent it.
                    unsafe { run_vnni(packed.path, threads, g, full_blocks, k) };
                    full_blocks
                }
                _ => 0,
            };
            let rest = rows - in_place;
            if rest == 0 {
                return;
            }
            let x = x.slice(in_place * k..rows * k);
            let rows_padded = rest.next_multiple_of(AMX_BLOCK_ROWS);
            with_x_buffer(rows_padded * k_padded, |xb| {
                convert_to_tiles(x, k, k_padded, xb);
                let g = VnniGemm {
                    x: XOperand::AmxTiles(AmxX::tiles(xb, k_padded)),
                    // SAFETY: row `in_place` of C is inside it (rest > 0 rows follow).
                    c: unsafe { c.add(in_place * n) },
                    ..g
                };
                // SAFETY: X is padded to whole 32-row blocks; C's rows from `in_place` as lent.
                unsafe { run_vnni(packed.path, threads, g, rest, k) }
            })
        }
    }
}

/// `dst = src` rounded to bf16, to nearest with ties to even, a subnormal to zero of its sign
/// (as AVX512-BF16's conversion rounds, and the bf16 multiplies read subnormals as zero anyway),
/// on [`threads::num_threads`] threads: with that conversion where the CPU has it, which the
/// AMX kernel's rounding of X and of a bf16 C shares, else by [`round_bits`].
pub fn round_into(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    assert_eq!(src.len(), dst.len(), "round_into: lengths differ");
    const CHUNK: usize = 1 << 14;
    let chunks: Vec<_> = src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)).collect();
    threads::parallel_each(chunks, |(src, dst)| round_on_this_thread(src, dst));
}

/// [`round_into`] on the calling thread alone (for kernels that round their own output, a
/// block at a time).
pub(crate) fn round_on_this_thread(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    assert_eq!(src.len(), dst.len(), "round_into: lengths differ");
    if avx512bf16_detected() {
        // SAFETY: AVX512-BF16 was detected.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::round_run(src, dst)
        };
        #[cfg(target_arch = "x86_64")]
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(bf16::from_bits(round_bits(s)));
    }
}

/// One value as [`round_into`] rounds it: `half`'s rounding, with a subnormal flushed to zero.
#[inline]
pub fn round_bits(v: f32) -> u16 {
    if v.is_subnormal() {
        (v.to_bits() >> 16) as u16 & 0x8000
    } else {
        bf16::from_f32(v).to_bits()
    }
}

/// [`round_into`] into a fresh vector.
pub fn rounded(src: &[f32]) -> Vec<bf16> {
    let mut out = Vec::with_capacity(src.len());
    round_into(src, &mut out.spare_capacity_mut()[..src.len()]);
    // SAFETY: `round_into` initialised every element.
    unsafe { out.set_len(src.len()) };
    out
}

/// [`VnniGemm`] `g` over `rows` rows of C, on `threads` threads.
///
/// # Safety
/// `g.c` must hold `rows×g.n` elements that are ours alone for the call; X must be padded to
/// whole MR-row panels of `path`.
unsafe fn run_vnni(path: Bf16Path, threads: usize, g: VnniGemm<'_>, rows: usize, k: usize) {
    let bl = blocking(path);
    let (tm, tn) = gemm::thread_grid(threads, rows, g.n, k, bl);
    threads::parallel_for(tm * tn, |task| {
        let rows = gemm::split_range(rows, tm, bl.mr, task / tn);
        let cols = gemm::split_range(g.n, tn, bl.nr, task % tn);
        if rows.is_empty() || cols.is_empty() {
            return;
        }
        // SAFETY: `rows×cols` is this task's own block of C (the tasks tile C disjointly),
        // rows start at multiples of MR (inside the padded X) and columns at multiples of the
        // panel width.
        unsafe { vnni_block(path, g, rows, cols) }
    });
}

/// `C = Aᵀ·B` with `A` (`[k, m]`, row-major f32) and `B` (`[k, n]`, row-major f32 or bf16)
/// rounded to bf16 and f32 accumulation into `out` (`[m, n]`, need not be initialised): a
/// linear layer's weight gradient `dW = dYᵀ·X`, whose depth is the batch's rows, on `path` (a
/// supported one: training passes [`Bf16Path::best`]). A bf16 `B` (an input rounded once for
/// several GEMMs, or stored rounded by the op that made it) gives the bits of its f32 source,
/// from half the bytes. On the bf16
/// instruction paths both operands become pair-major words by one vector pass each: `B` as VNNI
/// panels; `A` read in place by the AVX512-BF16 kernel, or, for AMX, transposed 16×16 words at
/// a time into its X tiles. The f32 path multiplies the rounded operands by the f32 GEMM.
///
/// With `a_column_sums` (`m` values) it also writes `Σ_p A[p, i]` of the unrounded `A` in f32,
/// in the order of [`BIAS_SUM_CHUNK_ROWS`] (the bits of
/// [`crate::cpu::elementwise::bias_backward`]): a bias gradient `Σ_rows dY`. The bf16
/// instruction paths sum as they convert `A` (a separate pass over `dY` was 2–3% of a bf16
/// training step); the f32 path makes that pass.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_at_b(
    path: Bf16Path,
    a: &[f32],
    b: Bf16Input<'_>,
    m: usize,
    n: usize,
    k: usize,
    out: &mut [MaybeUninit<f32>],
    a_column_sums: Option<&mut [f32]>,
) {
    assert_eq!(a.len(), k * m, "gemm_bf16_at_b: A has wrong length");
    assert_eq!(b.len(), k * n, "gemm_bf16_at_b: B has wrong length");
    assert_eq!(out.len(), m * n, "gemm_bf16_at_b: output has wrong length");
    if let Some(sums) = &a_column_sums {
        assert_eq!(
            sums.len(),
            m,
            "gemm_bf16_at_b: column sums have wrong length"
        );
    }
    let (a_column_sums, separate_sums) = match path {
        Bf16Path::Amx | Bf16Path::Avx512Bf16 if k > 0 && n > 0 => (a_column_sums, None),
        _ => (None, a_column_sums),
    };
    if let Some(sums) = separate_sums {
        sums.fill(0.0);
        crate::cpu::elementwise::bias_backward(m, a, sums);
    }
    let ep = Epilogue {
        beta: 0.0,
        bias: None,
        act: Activation::Identity,
    };
    path.assert_supported();
    let threads = if m * n * k < gemm::THREADED_MIN_WORK {
        1
    } else {
        threads::num_threads()
    };
    if m == 0 || n == 0 {
        return;
    }
    if matches!(path, Bf16Path::F32(_)) || k == 0 {
        let isa = match path {
            Bf16Path::F32(isa) => isa,
            _ => Isa::best(),
        };
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|v| v.to_bf16().to_f32()).collect() };
        let s = GemmShape {
            m,
            n,
            k,
            trans_a: true,
            trans_b: false,
        };
        let (a, b) = (round(a), b.rounded_f32());
        let c = TilePtr(out.as_mut_ptr().cast());
        // SAFETY: C holds m×n elements (checked) and is ours alone; with beta = 0 each is
        // stored before anything reads it.
        unsafe { gemm::gemm_f32_from(isa, threads, s, &a, BOperand::Raw(&b), c, ep) };
        return;
    }
    let pairs = k.next_multiple_of(K_ALIGN) / 2;
    let panels = n.div_ceil(PANEL_COLS);
    // Whole 16-word stores and whole MR-row panels both fit (AVX512-BF16: the pair-major
    // words' row stride; AMX: the rows of its tiles).
    let stride = m.next_multiple_of(blocking(path).mr).next_multiple_of(16);
    AT_B_BUFFERS.with(|cell| {
        let mut buffers = cell.borrow_mut();
        let (x, w) = &mut *buffers;
        // Scratch reused across calls (fresh zeroed pages cost a tenth of a bf16 training step):
        // every word of both is written below, padding included.
        x.ensure(pairs * stride);
        w.ensure(panels * pairs * PANEL_COLS);
        let (x, w) = (
            &mut x.as_mut_slice()[..pairs * stride],
            &mut w.as_mut_slice()[..panels * pairs * PANEL_COLS],
        );
        let w_offset = |p, j0| panel_word(pairs, p, j0);
        interleave_row_pairs(b, k, n, panels * PANEL_COLS, pairs, w, w_offset, None);
        let x = if path == Bf16Path::Amx {
            interleave_to_tiles(a, k, m, pairs, x, a_column_sums);
            XOperand::AmxTiles(AmxX::tiles(bytemuck::cast_slice(x), 2 * pairs))
        } else {
            let x_offset = |p: usize, i0: usize| p * stride + i0;
            let a = Bf16Input::F32(a);
            interleave_row_pairs(a, k, m, stride, pairs, x, x_offset, a_column_sums);
            XOperand::PairMajor { words: x, stride }
        };
        let g = VnniGemm {
            x,
            w,
            n,
            k_padded: 2 * pairs,
            c: CPtr::F32(TilePtr(out.as_mut_ptr().cast())),
            ep,
        };
        // SAFETY: the pair-major X covers `stride` ≥ whole MR-row panels; C as checked above.
        unsafe { run_vnni(path, threads, g, m, k) }
    })
}

/// Rounds `a` (`[k, m]` row-major) to bf16 into AMX X tiles of `aᵀ` (`[m, k]`, laid out as
/// [`convert_to_tiles`] lays out X, as 32-bit pairs of depth steps): `dst` holds
/// `dst.len() / (16·pairs)` groups of 16 rows, `pairs` (a multiple of 16) pairs deep, zero past
/// `m` and `k`; groups are spread over threads.
fn interleave_to_tiles(
    a: &[f32],
    k: usize,
    m: usize,
    pairs: usize,
    dst: &mut [u32],
    column_sums: Option<&mut [f32]>,
) {
    let group_len = TILE_ROWS * pairs;
    // Each group's task also sums its 16 columns of `a` over all `k` rows, when asked: the
    // sums need no reduction across tasks, and are the same whatever the thread count.
    let mut sums: Vec<Option<&mut [f32]>> = match column_sums {
        Some(sums) => sums.chunks_mut(TILE_ROWS).map(Some).collect(),
        None => Vec::new(),
    };
    let groups: Vec<_> = dst
        .chunks_mut(group_len)
        .enumerate()
        .map(|(g, group)| (g, group, sums.get_mut(g).and_then(Option::take)))
        .collect();
    threads::parallel_each(groups, |(g, group, sums)| {
        // SAFETY: a Vnni packing path (AMX) exists only where AVX512-BF16 was detected.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::interleave_tile_group(a, k, m, g * TILE_ROWS, group, sums)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no bf16 instructions: {:?}", (a, k, m, g, group, sums));
    });
}

/// Where in VNNI panels `pairs` deep the 16 words of pair step `p` and columns `j0..j0 + 16`
/// start (`j0` a multiple of 16).
fn panel_word(pairs: usize, p: usize, j0: usize) -> usize {
    ((j0 / PANEL_COLS) * pairs + p) * PANEL_COLS + j0 % PANEL_COLS
}

/// Rounds `src` (`[k, n]` row-major) to bf16 and writes, for each pair step `p < pairs` and
/// each 16 of `width ≥ n` columns from `j0`, the 16 words `[src(2p, j), src(2p + 1, j)]` (low,
/// high half; zero past `k` and `n`, so padding is written too) at `dst[offset(p, j0)..]`; pair
/// steps are spread over threads, [`BIAS_SUM_CHUNK_ROWS`] rows a task. `offset` must map distinct
/// `(p, j0)` to disjoint runs of 16 words inside `dst`. With `column_sums` (`n` values) it also
/// writes the column sums of the unrounded `src`, as [`crate::cpu::elementwise::bias_backward`]
/// adds them: each task sums its chunk of rows, and the chunks' sums are added in order.
#[allow(clippy::too_many_arguments)]
fn interleave_row_pairs(
    src: Bf16Input<'_>,
    k: usize,
    n: usize,
    width: usize,
    pairs: usize,
    dst: &mut [u32],
    offset: impl Fn(usize, usize) -> usize + Sync,
    column_sums: Option<&mut [f32]>,
) {
    assert_eq!(
        src.len(),
        k * n,
        "interleave_row_pairs: wrong source length"
    );
    const PAIRS_PER_TASK: usize = BIAS_SUM_CHUNK_ROWS / 2;
    let tasks = pairs.div_ceil(PAIRS_PER_TASK);
    let len = dst.len();
    // Addresses, so that the tasks may share them (each writes its own words, see below, and
    // its own row of chunk sums).
    let base = dst.as_mut_ptr() as usize;
    let mut chunk_sums = match column_sums {
        Some(_) => vec![0.0f32; tasks * n],
        None => Vec::new(),
    };
    let sums_base = (!chunk_sums.is_empty()).then_some(chunk_sums.as_mut_ptr() as usize);
    threads::parallel_for(tasks, |task| {
        let range = task * PAIRS_PER_TASK..((task + 1) * PAIRS_PER_TASK).min(pairs);
        // SAFETY: row `task` of the `tasks × n` chunk sums is this task's alone.
        let mut chunk_sum = sums_base
            .map(|b| unsafe { std::slice::from_raw_parts_mut((b as *mut f32).add(task * n), n) });
        for p in range {
            let row = |r: usize| (r < k).then(|| src.slice(r * n..(r + 1) * n));
            // SAFETY: a Vnni packing exists only where AVX512-BF16 was detected; each 16-word
            // run is inside `dst` (checked before it is written) and this step's alone (the
            // caller's `offset` is injective).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::interleave_pair_row(
                    row(2 * p),
                    row(2 * p + 1),
                    width,
                    |j0| {
                        let at = offset(p, j0);
                        assert!(at + 16 <= len, "interleave_row_pairs: offset outside dst");
                        (base as *mut u32).add(at)
                    },
                    chunk_sum.as_deref_mut(),
                )
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "no bf16 instructions: {:?}",
                (len, base, row(p), &chunk_sum)
            );
        }
    });
    if let Some(sums) = column_sums {
        sums.fill(0.0);
        for chunk in chunk_sums.chunks_exact(n.max(1)) {
            for (s, &c) in sums.iter_mut().zip(chunk) {
                *s += c;
            }
        }
    }
}

/// Register tile (`mr×nr`) and cache blocking of the two bf16 instruction paths. AVX512-BF16:
/// 14×32 (28 accumulators, 2 W vectors and the broadcast fill 31 zmm, as in the f32 kernel);
/// depth blocks of 1024, so that 336 packed rows of X (672 KiB) sit in L2 and the W panel
/// (64 KiB) streams from L2. Against blocks of 384 (the W panel held in L1), medians of six
/// alternating rounds on one Zen 4 core: 1024³ 13.85 → 11.09 ms, the FFN's 4096×384×1536
/// 31.56 → 27.72 ms, 1024³ on 2 threads 6.96 → 5.97 ms: each extra depth block re-reads and
/// re-stores every C tile, which costs more than the L1 saves. (Rounding X straight into
/// whole-depth panels, with no per-block packing, measured the same at 1024³ and 5% slower on
/// the FFN shape: the kernel then met X's first reads from memory.)
///
/// AMX: 32×32 blocks of four C tiles, depth blocks of 256, column blocks of 256. X's two tile
/// rows of one depth block (16 KiB) stay in L1 while the 8 panels of the column block stream
/// their W tiles from L2, and the panels' C tiles wait in a 32 KiB buffer between depth blocks
/// (C is stored once, after the last, with its epilogue). Over the whole depth, X's tiles came
/// from L2 too: each `tdpbf16ps` waited on 1 KiB from L2. Medians of four alternating rounds on
/// one core of a 2-core Xeon VM with AMX (1 thread): 1024³ 2.28 → 2.02 ms (depth blocks
/// of 128 / 192 / 320 / 512: 2.20 / 2.13 / 2.16 / 2.42; column blocks of 128 / 512 with 256:
/// 2.06 / 2.08), 4096×1536×384 6.02 → 5.46, 128×1536×384 0.139 → 0.122, 4096×384×1536
/// 5.45 → 5.62 (noise-level).
fn blocking(path: Bf16Path) -> Blocking {
    match path {
        Bf16Path::Amx => Blocking {
            mr: AMX_BLOCK_ROWS,
            nr: PANEL_COLS,
            mc: 2 * TILE_ROWS,
            kc: 256,
            nc: AMX_NC,
        },
        _ => Blocking {
            mr: DPBF16_MR,
            nr: PANEL_COLS,
            mc: DPBF16_MR * 24,
            kc: 1024,
            nc: 3072,
        },
    }
}

const DPBF16_MR: usize = 14;
/// The deepest product the AMX path runs as one depth block (see `amx_block`).
const AMX_ONE_BLOCK_DEPTH: usize = 384;
/// Columns of W per AMX column block.
const AMX_NC: usize = 256;
/// Rows of an AMX tile (and of its 16×16 f32 C tile).
const TILE_ROWS: usize = 16;
/// Rows of X (and C) in one AMX block: two tiles.
const AMX_BLOCK_ROWS: usize = 2 * TILE_ROWS;

thread_local! {
    /// [`gemm_bf16_at_b`]'s pair-major operands, reused across calls on this thread.
    static AT_B_BUFFERS: std::cell::RefCell<(CacheAligned<u32>, CacheAligned<u32>)> =
        const { std::cell::RefCell::new((CacheAligned::new(), CacheAligned::new())) };
    /// X rounded to bf16, reused across calls on this thread.
    static X_BUFFER: std::cell::RefCell<CacheAligned<u16>> =
        const { std::cell::RefCell::new(CacheAligned::new()) };
}

/// Lends a cache-aligned buffer of `len` bf16 values.
fn with_x_buffer<R>(len: usize, f: impl FnOnce(&mut [u16]) -> R) -> R {
    let run = |buf: &mut CacheAligned<u16>| {
        buf.ensure(len);
        f(&mut buf.as_mut_slice()[..len])
    };
    X_BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => run(&mut buf),
        // Re-entered on this thread (cannot happen today, but stay correct if it does).
        Err(_) => run(&mut CacheAligned::new()),
    })
}

/// Rounds (or copies) the rows of `x` (`k` wide) into `dst` as AMX tiles: for each group of 16 rows, for
/// each 32 depth steps, the 16×32 bf16 tile stored contiguously (1 KiB, loaded with a 64-byte
/// stride), the depth zero-padded to `k_padded` and the rows to whole groups; groups are spread
/// over threads.
fn convert_to_tiles(x: Bf16Input<'_>, k: usize, k_padded: usize, dst: &mut [u16]) {
    const GROUPS_PER_TASK: usize = 4;
    let group_len = TILE_ROWS * k_padded;
    let chunks: Vec<_> = dst
        .chunks_mut(GROUPS_PER_TASK * group_len)
        .enumerate()
        .collect();
    threads::parallel_each(chunks, |(chunk, dst)| {
        for (g, group) in dst.chunks_mut(group_len).enumerate() {
            let first_row = (chunk * GROUPS_PER_TASK + g) * TILE_ROWS;
            let rows = x.slice(first_row * k..x.len());
            // SAFETY: a Vnni packing exists only where AVX512-BF16 was detected.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::round_tile_group(rows, k, group)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("no bf16 instructions: {rows:?} {group:?}");
        }
    });
}

/// Where a bf16 instruction path reads X.
#[derive(Clone, Copy)]
enum XOperand<'a> {
    /// Rows `k` wide, rounded to bf16 (or, bf16 already, copied) as the AVX512-BF16 kernel
    /// packs each cache block's panels from them.
    Rows(Bf16Input<'a>, usize),
    /// bf16 AMX tiles.
    AmxTiles(AmxX<'a>),
    /// Pair-major words, the pair `p` of row `i` at word `p·stride + i` (the AVX512-BF16
    /// kernel reads its panels from there in place).
    PairMajor { words: &'a [u32], stride: usize },
}

/// Where AMX reads X's tiles: the 16×32 tile of rows `16g..`, depth steps `32t..` starts at
/// `data[g·group_stride + t·tile_stride]` and its rows are `row_bytes` apart. All rows the
/// kernel reads exist: whole 32-row blocks.
#[derive(Clone, Copy)]
struct AmxX<'a> {
    data: &'a [u16],
    group_stride: usize,
    tile_stride: usize,
    row_bytes: usize,
}

impl<'a> AmxX<'a> {
    /// Contiguous 1 KiB tiles, as [`convert_to_tiles`] lays them out (`k_padded` deep).
    fn tiles(data: &'a [u16], k_padded: usize) -> AmxX<'a> {
        AmxX {
            data,
            group_stride: TILE_ROWS * k_padded,
            tile_stride: TILE_ROWS * 32,
            row_bytes: 64,
        }
    }

    /// Row-major bf16 rows `k` wide (a multiple of 32), read in place.
    fn rows(data: &'a [u16], k: usize) -> AmxX<'a> {
        AmxX {
            data,
            group_stride: TILE_ROWS * k,
            tile_stride: 32,
            row_bytes: 2 * k,
        }
    }
}

/// One call of a bf16 instruction path: X, the VNNI weight panels, and C (`n` wide) with its
/// epilogue.
#[derive(Clone, Copy)]
struct VnniGemm<'a> {
    x: XOperand<'a>,
    w: &'a [u32],
    n: usize,
    k_padded: usize,
    c: CPtr,
    ep: Epilogue<'a>,
}

/// The `rows×cols` block of C on a bf16 instruction path.
///
/// # Safety
/// `c` must point to the caller's `m×n` C, of which this call may write exactly `rows×cols`;
/// `rows.start` must be a multiple of the path's MR and `cols.start` of [`PANEL_COLS`].
unsafe fn vnni_block(path: Bf16Path, g: VnniGemm<'_>, rows: Range<usize>, cols: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the path was checked when the weight was packed for it; the rest is forwarded.
    unsafe {
        match path {
            Bf16Path::Amx => x86::vnni_block(path, g, rows, cols, &mut []),
            // The A panels of one MC×KC block, in pairs (as f32-sized words); no B buffer.
            _ => {
                let bl = blocking(path);
                let panels = Blocking {
                    kc: bl.kc / 2,
                    nc: 0,
                    ..bl
                };
                gemm::with_pack_buffers(panels, |a_buf, _| {
                    x86::vnni_block(path, g, rows, cols, a_buf)
                })
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{path:?} {:?} {:?}", (rows, cols), (g.n, g.k_padded))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;
    use std::ops::Range;

    use half::bf16;

    use super::{
        blocking, round_bits, Bf16Input, Bf16Path, CPtr, VnniGemm, XOperand, AMX_ONE_BLOCK_DEPTH,
        BIAS_SUM_CHUNK_ROWS, DPBF16_MR, PANEL_COLS, TILE_ROWS,
    };
    use crate::cpu::gemm::{finish, prefetch, store_tile, Activation, Epilogue, TilePtr};
    use crate::cpu::simd::Avx512;
    use crate::cpu::simd::Simd;

    /// `row[from..from + 16]`, lanes past the row's end zero. A whole vector is loaded unmasked:
    /// masked loads streamed about half as fast from memory on Zen 5 (the row-pair interleave
    /// of a 4096×1536 f32 gradient, 2 threads: 3.1 → 1.6 ms).
    #[inline(always)]
    fn load_16(row: &[f32], from: usize) -> __m512 {
        let lanes = row.len().saturating_sub(from).min(16);
        let at = row.as_ptr().wrapping_add(from);
        // SAFETY: only the `lanes` in-bounds lanes are read; every caller is compiled with
        // AVX-512 enabled, the CPU having been checked for it.
        unsafe {
            match lanes {
                16 => _mm512_loadu_ps(at),
                _ => _mm512_maskz_loadu_ps(((1u32 << lanes) - 1) as u16, at),
            }
        }
    }

    /// `row[from..from + 32]` rounded to bf16 as 16 words, pair `(2w, 2w + 1)` in word `w` (low,
    /// high half); lanes past the row's end read as zero.
    #[inline(always)]
    fn round_32(row: &[f32], from: usize) -> __m512i {
        // SAFETY: every caller is compiled with AVX512-BF16 enabled; a bf16 vector and an
        // integer vector share a layout.
        unsafe {
            std::mem::transmute(_mm512_cvtne2ps_pbh(
                load_16(row, from + 16),
                load_16(row, from),
            ))
        }
    }

    /// [`round_32`] of either kind of row: bf16 values are loaded as they are (unmasked where
    /// all 32 are inside the row, as [`load_16`]).
    #[inline(always)]
    fn words_32(row: Bf16Input<'_>, from: usize) -> __m512i {
        match row {
            Bf16Input::F32(row) => round_32(row, from),
            Bf16Input::Bf16(row) => {
                let lanes = row.len().saturating_sub(from).min(32);
                let at = row.as_ptr().wrapping_add(from);
                // SAFETY: only the `lanes` in-bounds values are read; the callers are compiled
                // with AVX512-BW.
                unsafe {
                    match lanes {
                        32 => _mm512_loadu_si512(at.cast()),
                        _ => _mm512_maskz_loadu_epi16(
                            (((1u64 << lanes) - 1) as u32) as __mmask32,
                            at.cast(),
                        ),
                    }
                }
            }
        }
    }

    /// `src` rounded to bf16 into `dst` (the same length), 32 values a step.
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn round_run(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
        assert_eq!(src.len(), dst.len());
        for from in (0..src.len()).step_by(32) {
            let lanes = (src.len() - from).min(32);
            let mask = (((1u64 << lanes) - 1) as u32) as __mmask32;
            // SAFETY: the `lanes` values from `from` are inside `dst`.
            unsafe {
                _mm512_mask_storeu_epi16(
                    dst.as_mut_ptr().add(from).cast(),
                    mask,
                    round_32(src, from),
                )
            };
        }
    }

    /// Rounds (or copies) the first 16 rows of `x` (`k` wide; missing rows read as zero) into one group of
    /// AMX tiles at `dst` (`16·k_padded` values, `k_padded` a multiple of 32): the tile of depth
    /// steps `32t..32t + 32` at `dst[512t..]`, row by row, the depth past `k` zero.
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn round_tile_group(x: Bf16Input<'_>, k: usize, dst: &mut [u16]) {
        let tiles = dst.len() / (TILE_ROWS * 32);
        assert_eq!(dst.len(), tiles * TILE_ROWS * 32);
        assert!(tiles * 32 >= k);
        for r in 0..TILE_ROWS {
            let row = x.slice(r * k..(r + 1) * k);
            for t in 0..tiles {
                // SAFETY: 32 bf16 at `512t + 32r` lie inside `dst` (its length checked).
                unsafe {
                    let at = dst.as_mut_ptr().add((t * TILE_ROWS + r) * 32);
                    _mm512_storeu_si512(at.cast(), words_32(row, t * 32));
                }
            }
        }
    }

    /// One pair step of [`super::interleave_row_pairs`]: [`interleave_16`] over the columns
    /// `0..width` of the rows `lo` and `hi`, the 16 words of columns `j0..` at `dst(j0)`, and,
    /// with `sum`, `sum[j] = (sum[j] + lo[j]) + hi[j]`. One call a row pair, not one a 16
    /// columns, so that the loop runs with the vector features enabled (the weight gradient
    /// 384×384 over 4096 rows, 2 threads: 4.3 → 3.6 ms, medians of three alternating runs).
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16; `dst(j0)` must be valid for 16 words.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn interleave_pair_row(
        lo: Option<Bf16Input<'_>>,
        hi: Option<Bf16Input<'_>>,
        width: usize,
        dst: impl Fn(usize) -> *mut u32,
        mut sum: Option<&mut [f32]>,
    ) {
        for j0 in (0..width).step_by(16) {
            // SAFETY: the caller vouched for `dst(j0)`.
            let (l, h) = unsafe { interleave_16(lo, hi, j0, dst(j0)) };
            if let Some(sum) = sum.as_deref_mut().filter(|s| j0 < s.len()) {
                // SAFETY: AVX512-BF16 implies AVX-512.
                unsafe { add_pair(sum, j0, l, h) };
            }
        }
    }

    /// Writes the 16 words `[lo(j), hi(j)]` for `j` in `j0..j0 + 16` (bf16, low and high half;
    /// f32 rows rounded) at `dst`; a missing row, or a column past the row's end, reads as zero.
    /// Returns the two rows' values in f32 (unrounded; bf16 ones widened), for callers that also
    /// sum the columns.
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16; `dst` must be valid for 16 words.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn interleave_16(
        lo: Option<Bf16Input<'_>>,
        hi: Option<Bf16Input<'_>>,
        j0: usize,
        dst: *mut u32,
    ) -> (__m512, __m512) {
        let zero = (_mm512_setzero_ps(), _mm512_setzero_si512());
        let (lo, lo_bits) = lo.map_or(zero, |r| bits_16(r, j0));
        let (hi, hi_bits) = hi.map_or(zero, |r| bits_16(r, j0));
        let words = _mm512_or_si512(lo_bits, _mm512_slli_epi32::<16>(hi_bits));
        // SAFETY: the caller vouched for 16 words at `dst`.
        unsafe { _mm512_storeu_si512(dst.cast(), words) };
        (lo, hi)
    }

    /// `row[j0..j0 + 16]` in f32 (bf16 values widened) and as bf16 bits in the low half of each
    /// 32-bit lane (f32 values rounded); lanes past the row's end zero. Whole vectors are
    /// loaded unmasked, as [`load_16`].
    #[inline(always)]
    fn bits_16(row: Bf16Input<'_>, j0: usize) -> (__m512, __m512i) {
        // SAFETY: every caller is compiled with AVX512-BF16 (and so AVX-512 and AVX512-BW)
        // enabled; only in-bounds lanes are read; a bf16 vector and an integer vector share a
        // layout.
        unsafe {
            match row {
                Bf16Input::F32(row) => {
                    let v = load_16(row, j0);
                    let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                    (v, _mm512_cvtepu16_epi32(h))
                }
                Bf16Input::Bf16(row) => {
                    let lanes = row.len().saturating_sub(j0).min(16);
                    let at = row.as_ptr().wrapping_add(j0);
                    let h = match lanes {
                        16 => _mm256_loadu_si256(at.cast()),
                        _ => _mm256_maskz_loadu_epi16(((1u32 << lanes) - 1) as u16, at.cast()),
                    };
                    let bits = _mm512_cvtepu16_epi32(h);
                    (_mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits)), bits)
                }
            }
        }
    }

    /// `sum[j0..j0 + 16] = (sum + lo) + hi` for the lanes inside `sum` (two rows' values, as
    /// [`interleave_16`] returns them, added in row order).
    ///
    /// # Safety
    /// The CPU must support AVX-512.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn add_pair(sum: &mut [f32], j0: usize, lo: __m512, hi: __m512) {
        let lanes = sum.len().saturating_sub(j0).min(16);
        let mask = ((1u32 << lanes) - 1) as u16;
        let at = sum.as_mut_ptr().wrapping_add(j0);
        // SAFETY: only the `lanes` in-bounds lanes are read and written.
        unsafe {
            let acc = _mm512_maskz_loadu_ps(mask, at);
            _mm512_mask_storeu_ps(at, mask, _mm512_add_ps(_mm512_add_ps(acc, lo), hi));
        }
    }

    /// One group of [`super::interleave_to_tiles`]: the rows `i0..i0 + 16` of `aᵀ` (`a` is
    /// `[k, m]`). Each 16 pair steps of the 16 columns are interleaved as 16×16 words (a row per
    /// pair step, as [`interleave_16`] writes them) and transposed into the tile (a row per
    /// column of `a`).
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    pub(super) unsafe fn interleave_tile_group(
        a: &[f32],
        k: usize,
        m: usize,
        i0: usize,
        dst: &mut [u32],
        column_sums: Option<&mut [f32]>,
    ) {
        let tiles = dst.len() / (TILE_ROWS * 16);
        assert_eq!(dst.len(), tiles * TILE_ROWS * 16);
        assert!(2 * 16 * tiles >= k && a.len() == k * m);
        // SAFETY: AVX512-BF16 implies AVX-512, whose token this is.
        let s = unsafe { Avx512::new_unchecked() };
        let row = |r: usize| a.get(r * m..(r + 1) * m);
        let mut block = [0u32; 16 * 16];
        let (mut sums, mut chunk_sum) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        // Chunks of rows as `elementwise::bias_backward` sums them: the same bits.
        let tiles_per_chunk = BIAS_SUM_CHUNK_ROWS / 32;
        for t in 0..tiles {
            for q in 0..16 {
                let p = 16 * t + q;
                // SAFETY: row q of the 16×16 block.
                let (lo, hi) = unsafe {
                    interleave_16(
                        row(2 * p).map(Bf16Input::F32),
                        row(2 * p + 1).map(Bf16Input::F32),
                        i0,
                        block.as_mut_ptr().add(q * 16),
                    )
                };
                chunk_sum = _mm512_add_ps(_mm512_add_ps(chunk_sum, lo), hi);
            }
            if (t + 1) % tiles_per_chunk == 0 || t + 1 == tiles {
                sums = _mm512_add_ps(sums, chunk_sum);
                chunk_sum = _mm512_setzero_ps();
            }
            // SAFETY: the block holds 16 rows of 16 words; the tile's 256 words are inside
            // `dst` (its length checked).
            unsafe {
                s.transpose_block(
                    block.as_ptr().cast(),
                    16,
                    16,
                    dst.as_mut_ptr().add(t * 256).cast(),
                    16,
                    16,
                )
            };
        }
        if let Some(out) = column_sums {
            let mut lanes = [0.0f32; 16];
            // SAFETY: 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sums) };
            let len = out.len();
            out.copy_from_slice(&lanes[..len]);
        }
    }

    /// Packs `w` (`[n, k]` f32, a linear layer's `[out, in]`) into VNNI panels of `pairs`
    /// (a multiple of 16) pair steps at `dst`: a row's pairs are adjacent floats, so each 16 rows
    /// × 16 pairs are rounded as 16 rows of words and transposed into the panel, one row of 16
    /// columns per pair step. (Scalar, one word at a time, this packing was 6% of a bf16
    /// forward at 32×128, whose attention packs every head's `K`.)
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")]
    pub(super) unsafe fn pack_row_pairs(
        w: &[f32],
        n: usize,
        k: usize,
        pairs: usize,
        dst: &mut [u32],
    ) {
        assert!(w.len() == n * k && pairs.is_multiple_of(16) && 2 * pairs >= k);
        assert_eq!(dst.len(), n.div_ceil(PANEL_COLS) * pairs * PANEL_COLS);
        // SAFETY: AVX512-BF16 implies AVX-512, whose token this is.
        let s = unsafe { Avx512::new_unchecked() };
        let mut block = [0u32; 16 * 16];
        for j0 in (0..n).step_by(16) {
            let rows = (n - j0).min(16);
            let (panel, col) = (j0 / PANEL_COLS, j0 % PANEL_COLS);
            for p0 in (0..pairs).step_by(16) {
                for r in 0..rows {
                    let row = &w[(j0 + r) * k..(j0 + r + 1) * k];
                    // SAFETY: row r of the 16×16 block.
                    unsafe {
                        _mm512_storeu_si512(
                            block.as_mut_ptr().add(r * 16).cast(),
                            round_32(row, 2 * p0),
                        )
                    };
                }
                // SAFETY: the block's first `rows` rows were written; the 16 pair steps from p0
                // of this panel's columns col..col + rows are inside `dst` (its length checked).
                unsafe {
                    s.transpose_block(
                        block.as_ptr().cast(),
                        16,
                        rows,
                        dst.as_mut_ptr()
                            .add((panel * pairs + p0) * PANEL_COLS + col)
                            .cast(),
                        PANEL_COLS,
                        rows,
                    )
                };
            }
        }
    }

    /// [`super::vnni_block`] compiled for AVX512-BF16, on `path`'s kernel; `a_buf` holds the
    /// AVX512-BF16 kernel's packed panels of X.
    ///
    /// # Safety
    /// As [`super::vnni_block`]; the CPU must support `path` (both imply AVX512-BF16, and with
    /// it AVX-512).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")]
    pub(super) unsafe fn vnni_block(
        path: Bf16Path,
        v: VnniGemm<'_>,
        rows: Range<usize>,
        cols: Range<usize>,
        a_buf: &mut [f32],
    ) {
        // SAFETY: both bf16 instruction paths imply AVX-512, whose token this is.
        let s = unsafe { Avx512::new_unchecked() };
        // SAFETY: forwarded.
        unsafe {
            match path {
                Bf16Path::Amx => amx_block(s, v, rows, cols),
                _ => dpbf16_block(s, v, rows, cols, a_buf),
            }
        }
    }

    /// How many pair steps ahead the AVX512-BF16 kernel prefetches its W panel (as the f32
    /// kernel does, for a weight that streams from memory on every batch-1 call).
    const W_PREFETCH_PAIRS: usize = 32;

    /// `C[..MR, ..32] = act(X_panel·W_panel + beta·C + bias)` over `pairs` pair steps: `a` is
    /// a packed panel of X, `a_stride ≥ MR` 32-bit pairs per step (the first MR used), `w` a
    /// VNNI panel.
    ///
    /// A function of its own: inlined into the block loops (beside the AMX kernel and the
    /// other tile heights) the compiler kept a stack copy of every accumulator, 28 stores per
    /// step that ran the kernel at half speed.
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16. `a` must hold `pairs·a_stride` words, `w` `pairs·32`
    /// words, a non-null `bias` 32 values, and `c` must be valid for an `MR×32` tile with row
    /// stride `ldc`.
    #[inline(never)]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dpbf16_kernel<const MR: usize>(
        s: Avx512,
        pairs: usize,
        a: *const u32,
        a_stride: usize,
        w: *const u32,
        c: CPtr,
        ldc: usize,
        ep: Epilogue<'_>,
        bias: *const f32,
    ) {
        // Every caller has depth (no product of depth 0 reaches the bf16 instructions). Told
        // so, the compiler no longer zeroes a stack copy of the accumulators on each call for
        // the loop that might not run (a 1.8 KiB memset, 2% of a bf16 training step, whose
        // attention calls the kernel over 16 pair steps).
        assert!(pairs > 0, "dpbf16_kernel: a product of no depth");
        // SAFETY: the offsets stay inside what the caller vouched for.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; MR];
            for p in 0..pairs {
                let ahead = w.wrapping_add((p + W_PREFETCH_PAIRS) * PANEL_COLS);
                prefetch(ahead);
                prefetch(ahead.wrapping_add(16));
                let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(p * 32).cast()));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(w.add(p * 32 + 16).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(p * a_stride + r) as i32));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                }
            }
            match c {
                CPtr::F32(c) => {
                    store_tile::<Avx512, MR, 2>(s, &acc, c.0, ldc, ep.beta, bias, ep.act)
                }
                // One depth block (see `dpbf16_block`): beta is 0. `finish` as `store_tile`
                // applies it, so the bits are those of the f32 tile rounded.
                CPtr::Bf16(c) => {
                    let bias =
                        (!bias.is_null()).then(|| [s.load_ptr(bias), s.load_ptr(bias.add(16))]);
                    for (r, [lo, hi]) in acc.iter().enumerate() {
                        let lo = finish(s, *lo, bias.map(|b| b[0]), ep.act);
                        let hi = finish(s, *hi, bias.map(|b| b[1]), ep.act);
                        let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                        _mm512_storeu_si512(c.0.add(r * ldc).cast(), bits);
                    }
                }
            }
        }
    }

    /// [`super::vnni_block`] with `vdpbf16ps`: the f32 packed path's loops (columns, depth,
    /// rows, then panels), X's f32 rows rounded and packed per MC×KC block into MR-row panels
    /// of pairs ([`round_panel`]): read from 14 separate rows, the row pointers did not fit in
    /// the general registers and were reloaded from the stack on every step.
    ///
    /// # Safety
    /// As [`super::vnni_block`]; the CPU must support AVX512-BF16.
    #[inline(always)]
    unsafe fn dpbf16_block(
        s: Avx512,
        v: VnniGemm<'_>,
        rows: Range<usize>,
        cols: Range<usize>,
        a_buf: &mut [f32],
    ) {
        let (ep, bl) = (v.ep, blocking(Bf16Path::Avx512Bf16));
        // X rows and W panels are both `pairs` words deep.
        let pairs = v.k_padded / 2;
        let kc_pairs = bl.kc / 2;
        let c = v.c;
        assert!(
            matches!(c, CPtr::F32(_)) || pairs <= kc_pairs,
            "the AVX512-BF16 kernel accumulates depth blocks in an f32 C"
        );
        // An edge tile's kernel stores every value `store_edge` then reads.
        let mut tile = [MaybeUninit::<f32>::uninit(); DPBF16_MR * PANEL_COLS];
        for jc in cols.clone().step_by(bl.nc) {
            let nc = bl.nc.min(cols.end - jc);
            for pc in (0..pairs).step_by(kc_pairs) {
                let kc = kc_pairs.min(pairs - pc);
                let ep = ep.for_block(pc, kc, pairs);
                for ic in rows.clone().step_by(bl.mc) {
                    let mc = bl.mc.min(rows.end - ic);
                    // Where the MR-row panel at row offset `ir` starts, and its words per step.
                    let (a_panels, a_step, panel_offset): (*const u32, usize, usize) = match v.x {
                        XOperand::PairMajor { words, stride } => {
                            (words[pc * stride + ic..].as_ptr(), stride, 1)
                        }
                        XOperand::Rows(x, k) => {
                            for (panel, ir) in (0..mc).step_by(DPBF16_MR).enumerate() {
                                let dst = &mut a_buf[panel * DPBF16_MR * kc..][..DPBF16_MR * kc];
                                // SAFETY: the caller vouched for AVX512-BF16.
                                unsafe { round_panel(s, x, k, ic + ir, pc, kc, dst) };
                            }
                            (a_buf.as_ptr().cast::<u32>(), DPBF16_MR, kc)
                        }
                        XOperand::AmxTiles(_) => unreachable!("bf16 tiles are AMX's X"),
                    };
                    for jr in (0..nc).step_by(PANEL_COLS) {
                        let panel = (jc + jr) / PANEL_COLS;
                        let w = v.w[(panel * pairs + pc) * PANEL_COLS..].as_ptr();
                        for ir in (0..mc).step_by(DPBF16_MR) {
                            let (tile_rows, tile_cols) =
                                (DPBF16_MR.min(mc - ir), PANEL_COLS.min(nc - jr));
                            // SAFETY (this block): the A panel holds kc steps of MR pairs, the
                            // W panel is 32 wide and `pairs` deep, and
                            // (ic + ir, jc + jr) is inside rows×cols, which the caller owns.
                            unsafe {
                                let a = a_panels.add(ir * panel_offset);
                                let cp = c.add((ic + ir) * v.n + jc + jr);
                                if tile_rows == DPBF16_MR && tile_cols == PANEL_COLS {
                                    let bias =
                                        ep.bias.map_or(std::ptr::null(), |b| b[jc + jr..].as_ptr());
                                    dpbf16_kernel::<DPBF16_MR>(
                                        s, kc, a, a_step, w, cp, v.n, ep, bias,
                                    );
                                    continue;
                                }
                                let scratch = CPtr::F32(TilePtr(tile.as_mut_ptr().cast()));
                                let plain = Epilogue {
                                    beta: 0.0,
                                    bias: None,
                                    act: Activation::Identity,
                                };
                                let null = std::ptr::null();
                                let ld = PANEL_COLS;
                                match tile_rows {
                                    0..=2 => dpbf16_kernel::<2>(
                                        s, kc, a, a_step, w, scratch, ld, plain, null,
                                    ),
                                    3..=4 => dpbf16_kernel::<4>(
                                        s, kc, a, a_step, w, scratch, ld, plain, null,
                                    ),
                                    5..=8 => dpbf16_kernel::<8>(
                                        s, kc, a, a_step, w, scratch, ld, plain, null,
                                    ),
                                    _ => dpbf16_kernel::<DPBF16_MR>(
                                        s, kc, a, a_step, w, scratch, ld, plain, null,
                                    ),
                                }
                                store_edge(
                                    tile.as_ptr().cast(),
                                    ld,
                                    tile_rows,
                                    tile_cols,
                                    cp,
                                    v.n,
                                    ep,
                                    jc + jr,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// How far ahead (in floats) [`round_panel`] prefetches each of its rows.
    const ROUND_PREFETCH_AHEAD: usize = 128;

    /// One MR-row panel of X rounded to bf16 (or copied, if bf16) as it is packed: rows `first..first + MR` of `x`
    /// (`k` wide; a row past its end reads as zeros), pair steps `p0..p0 + steps` (`steps` a
    /// multiple of 16; pairs past `k` are zeros), into `dst[step·MR + r]` as 32-bit words.
    /// Sixteen steps at a time: each row's 32 floats become one vector of 16 words, and the
    /// f32 packer's transpose (it moves 32-bit words, never computes on them) turns the rows
    /// into steps. Rounding here rather than in a pass of its own saves writing and reading
    /// back a bf16 copy of X.
    ///
    /// # Safety
    /// The CPU must support AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma")]
    unsafe fn round_panel(
        s: Avx512,
        x: Bf16Input<'_>,
        k: usize,
        first: usize,
        p0: usize,
        steps: usize,
        dst: &mut [f32],
    ) {
        assert!(steps.is_multiple_of(16) && dst.len() >= steps * DPBF16_MR);
        let rows: [Bf16Input<'_>; DPBF16_MR] =
            std::array::from_fn(|r| x.slice((first + r) * k..(first + r + 1) * k));
        // Only the MR rows written below are read (zeroing the block was a memset per call).
        let mut block = [MaybeUninit::<f32>::uninit(); 16 * 16];
        for c0 in (0..steps).step_by(16) {
            let col = 2 * (p0 + c0);
            for (r, &row) in rows.iter().enumerate() {
                match row {
                    Bf16Input::F32(v) => {
                        prefetch(v.as_ptr().wrapping_add(col + ROUND_PREFETCH_AHEAD))
                    }
                    Bf16Input::Bf16(v) => {
                        prefetch(v.as_ptr().wrapping_add(col + ROUND_PREFETCH_AHEAD))
                    }
                }
                let words: __m512 = std::mem::transmute(words_32(row, col));
                // SAFETY: row r of the 16×16 block.
                unsafe { _mm512_storeu_ps(block.as_mut_ptr().add(r * 16).cast(), words) };
            }
            // SAFETY: the block holds MR rows of 16 words; the 16 steps from c0 are inside dst
            // (asserted).
            unsafe {
                s.transpose_block(
                    block.as_ptr().cast(),
                    16,
                    DPBF16_MR,
                    dst.as_mut_ptr().add(c0 * DPBF16_MR),
                    DPBF16_MR,
                    DPBF16_MR,
                )
            };
        }
    }

    /// Stores the `rows×cols` corner of a computed tile (row stride `ld`) through the scalar
    /// epilogue, for a tile that overhangs C's edge; into a bf16 C each value is rounded as the
    /// f32 C would hold it.
    ///
    /// # Safety
    /// `tile` must hold `rows` rows of stride `ld`, and `c` must be valid for `rows×cols`
    /// elements with row stride `ldc` (for reads unless beta = 0).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store_edge(
        tile: *const f32,
        ld: usize,
        rows: usize,
        cols: usize,
        c: CPtr,
        ldc: usize,
        ep: Epilogue<'_>,
        col0: usize,
    ) {
        for r in 0..rows {
            for j in 0..cols {
                // SAFETY: inside the corner the caller vouched for.
                unsafe {
                    let value = *tile.add(r * ld + j);
                    match c {
                        CPtr::F32(c) => ep.store(c.0.add(r * ldc + j), value, col0 + j),
                        CPtr::Bf16(c) => {
                            let mut stored = 0.0f32;
                            ep.store(&mut stored, value, col0 + j);
                            *c.0.add(r * ldc + j) = round_bits(stored);
                        }
                    }
                }
            }
        }
    }

    /// The `rows×cols` corner of the 32×32 scratch block `tile` through the epilogue (its bias
    /// from `bias`, the block's 32 values, when given) into a bf16 C with row stride `ldc`:
    /// a whole block as vectors, one that overhangs C's edge by the scalar epilogue, as the f32
    /// C is stored, so the values rounded are those an f32 C would hold.
    ///
    /// # Safety
    /// `c` must be valid for `rows×cols` elements with row stride `ldc`; a given `bias` for 32
    /// values; the CPU must support AVX512-BF16.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn store_bf16(
        s: Avx512,
        tile: *const f32,
        rows: usize,
        cols: usize,
        c: *mut u16,
        ldc: usize,
        ep: Epilogue<'_>,
        bias: Option<*const f32>,
        col0: usize,
    ) {
        // SAFETY (whole body): inside the tile, the bias and the corner the caller vouched for.
        unsafe {
            if rows == 32 && cols == 32 {
                let bias = bias.map(|b| [s.load_ptr(b), s.load_ptr(b.add(16))]);
                for r in 0..rows {
                    let row = tile.add(r * 32);
                    let lo = finish(s, s.load_ptr(row), bias.map(|b| b[0]), ep.act);
                    let hi = finish(s, s.load_ptr(row.add(16)), bias.map(|b| b[1]), ep.act);
                    let bits: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_storeu_si512(c.add(r * ldc).cast(), bits);
                }
                return;
            }
            let ep = Epilogue {
                bias: bias.and(ep.bias),
                ..ep
            };
            store_edge(tile, 32, rows, cols, CPtr::Bf16(TilePtr(c)), ldc, ep, col0);
        }
    }

    /// The tile configuration (palette 1): all eight tiles 16 rows × 64 bytes. tmm0–3 are the
    /// 2×2 C block (16×16 f32 each), tmm4–5 two 16×32 bf16 tiles of X, tmm6–7 two 16-pair ×
    /// 16-column tiles of W.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn all_full() -> TileConfig {
            let mut cfg = [0u8; 64];
            cfg[0] = 1;
            for t in 0..8 {
                cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
                cfg[48 + t] = TILE_ROWS as u8;
            }
            TileConfig(cfg)
        }
    }

    /// A 32×32 f32 block, where the four C tiles are stored for the epilogue.
    #[repr(C, align(64))]
    struct Block32([f32; 32 * 32]);

    /// The four C tiles (256 f32 each) of every panel of a column block, kept between depth
    /// blocks.
    const PARTIAL_LEN: usize = super::AMX_NC / PANEL_COLS * 4 * 256;
    #[repr(C, align(64))]
    struct Partial([f32; PARTIAL_LEN]);

    /// [`super::vnni_block`] with AMX: for each 256-column block of W, each 32 rows of X, each
    /// 256-deep block of the depth, each 32-column panel: four C tiles accumulate over the
    /// depth block (two X tiles × two W tiles per 32 depth steps), wait in `partial` for the
    /// next one, and after the last are stored to a scratch block and go through the epilogue
    /// into C.
    ///
    /// # Safety
    /// As [`super::vnni_block`]; this process must hold the AMX tile-data permission.
    #[inline(always)]
    unsafe fn amx_block(s: Avx512, v: VnniGemm<'_>, rows: Range<usize>, cols: Range<usize>) {
        let (c, ep, bl) = (v.c, v.ep, blocking(Bf16Path::Amx));
        let cfg = TileConfig::all_full();
        // C = X·W (+ bias): full tiles need no epilogue and are stored straight into C.
        let plain = ep.beta == 0.0 && ep.act == Activation::Identity;
        // Scratch written by tile stores before it is read: zeroing these 36 KiB on every call
        // cost 4% of a bf16 forward at 32×128, whose attention makes 768 small products a layer.
        let mut block = MaybeUninit::<Block32>::uninit();
        let out = block.as_mut_ptr().cast::<f32>();
        // A depth up to AMX_ONE_BLOCK_DEPTH (the model's 384) in one block: splitting 384 as
        // 256 + 128 spilled and reloaded the C tiles in between, and one block measured 12%
        // faster at 4096×1536×384 (medians of six alternating rounds, one thread).
        let kc = if v.k_padded <= AMX_ONE_BLOCK_DEPTH {
            v.k_padded
        } else {
            bl.kc
        };
        let mut partial = MaybeUninit::<Partial>::uninit();
        let pairs = v.k_padded / 2;
        let XOperand::AmxTiles(x) = v.x else {
            unreachable!("AMX reads X as bf16 tiles")
        };
        // Bytes between rows: of an X tile, of a W panel (32 words), of the scratch block.
        let (ldx, ldw, ldo) = (x.row_bytes, PANEL_COLS * 4, 32usize * 4);
        // SAFETY (whole body): the X rows are padded to a multiple of 32 (rows.start is one),
        // the panels hold `pairs` rows of 32 words, so every tile load stays inside them; the
        // tile stores stay inside `block`; C is written only inside rows×cols.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            for jc in cols.clone().step_by(bl.nc) {
                let nc = bl.nc.min(cols.end - jc);
                for ic in rows.clone().step_by(bl.mc) {
                    let x0 = x.data.as_ptr().add(ic / TILE_ROWS * x.group_stride);
                    let x1 = x0.add(x.group_stride);
                    for kb in (0..v.k_padded).step_by(kc) {
                        let depth = kb..(kb + kc).min(v.k_padded);
                        let last = depth.end == v.k_padded;
                        for jr in (0..nc).step_by(PANEL_COLS) {
                            let panel = (jc + jr) / PANEL_COLS;
                            let w = v.w.as_ptr().add(panel * pairs * PANEL_COLS);
                            // This panel's four C tiles between depth blocks, 256 f32 apart.
                            let acc = partial
                                .as_mut_ptr()
                                .cast::<f32>()
                                .add(jr / PANEL_COLS * 4 * 256);
                            let (tile_rows, tile_cols) = (32.min(rows.end - ic), 32.min(nc - jr));
                            let full = tile_rows == 32 && tile_cols == 32;
                            let bias = ep.bias.map(|b| b[jc + jr..].as_ptr());
                            let bias_in_tiles = plain && full && bias.is_some();
                            // An f32 C takes whole tiles as they are.
                            let direct = plain && full && matches!(c, CPtr::F32(_));
                            if kb == 0 && bias_in_tiles {
                                // The bias as every row of the C tiles (a zero row stride), so
                                // the product lands on it and the tiles can go straight to C.
                                asm!(
                                    "tileloadd tmm0, [{b} + {zero} * 1]",
                                    "tileloadd tmm1, [{b} + {zero} * 1 + 64]",
                                    "tileloadd tmm2, [{b} + {zero} * 1]",
                                    "tileloadd tmm3, [{b} + {zero} * 1 + 64]",
                                    b = in(reg) bias.unwrap_or(std::ptr::null()),
                                    zero = in(reg) 0usize,
                                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                                    options(nostack, readonly),
                                );
                            } else if kb == 0 {
                                asm!(
                                    "tilezero tmm0",
                                    "tilezero tmm1",
                                    "tilezero tmm2",
                                    "tilezero tmm3",
                                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                                    options(nostack, nomem),
                                );
                            } else {
                                asm!(
                                    "tileloadd tmm0, [{a} + {ld} * 1]",
                                    "tileloadd tmm1, [{a} + {ld} * 1 + 1024]",
                                    "tileloadd tmm2, [{a} + {ld} * 1 + 2048]",
                                    "tileloadd tmm3, [{a} + {ld} * 1 + 3072]",
                                    a = in(reg) acc,
                                    ld = in(reg) 64usize,
                                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                                    options(nostack, readonly),
                                );
                            }
                            for k0 in depth.clone().step_by(32) {
                                let w0 = w.add(k0 / 2 * PANEL_COLS);
                                asm!(
                                    "tileloadd tmm4, [{x0} + {ldx} * 1]",
                                    "tileloadd tmm6, [{w0} + {ldw} * 1]",
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tileloadd tmm7, [{w1} + {ldw} * 1]",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    "tileloadd tmm5, [{x1} + {ldx} * 1]",
                                    "tdpbf16ps tmm2, tmm5, tmm6",
                                    "tdpbf16ps tmm3, tmm5, tmm7",
                                    x0 = in(reg) x0.add(k0 / 32 * x.tile_stride),
                                    x1 = in(reg) x1.add(k0 / 32 * x.tile_stride),
                                    w0 = in(reg) w0,
                                    w1 = in(reg) w0.add(TILE_ROWS),
                                    ldx = in(reg) ldx,
                                    ldw = in(reg) ldw,
                                    out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                                    options(nostack, readonly),
                                );
                            }
                            if !last {
                                asm!(
                                    "tilestored [{a} + {ld} * 1], tmm0",
                                    "tilestored [{a} + {ld} * 1 + 1024], tmm1",
                                    "tilestored [{a} + {ld} * 1 + 2048], tmm2",
                                    "tilestored [{a} + {ld} * 1 + 3072], tmm3",
                                    a = in(reg) acc,
                                    ld = in(reg) 64usize,
                                    options(nostack),
                                );
                                continue;
                            }
                            let at = ic * v.n + jc + jr;
                            if let (true, CPtr::F32(c)) = (direct, c) {
                                let cp = c.0.add(at);
                                asm!(
                                    "tilestored [{c00} + {ldc} * 1], tmm0",
                                    "tilestored [{c00} + {ldc} * 1 + 64], tmm1",
                                    "tilestored [{c10} + {ldc} * 1], tmm2",
                                    "tilestored [{c10} + {ldc} * 1 + 64], tmm3",
                                    c00 = in(reg) cp,
                                    c10 = in(reg) cp.add(TILE_ROWS * v.n),
                                    ldc = in(reg) v.n * 4,
                                    options(nostack),
                                );
                                continue;
                            }
                            asm!(
                                "tilestored [{o00} + {ldo} * 1], tmm0",
                                "tilestored [{o01} + {ldo} * 1], tmm1",
                                "tilestored [{o10} + {ldo} * 1], tmm2",
                                "tilestored [{o11} + {ldo} * 1], tmm3",
                                o00 = in(reg) out,
                                o01 = in(reg) out.add(TILE_ROWS),
                                o10 = in(reg) out.add(TILE_ROWS * 32),
                                o11 = in(reg) out.add(TILE_ROWS * 32 + TILE_ROWS),
                                ldo = in(reg) ldo,
                                options(nostack),
                            );
                            let bias = if bias_in_tiles { None } else { bias };
                            let c = match c {
                                CPtr::F32(c) => c,
                                CPtr::Bf16(c) => {
                                    let (cp, col0) = (c.0.add(at), jc + jr);
                                    store_bf16(
                                        s, out, tile_rows, tile_cols, cp, v.n, ep, bias, col0,
                                    );
                                    continue;
                                }
                            };
                            let cp = c.0.add(at);
                            if full {
                                let bias = bias.unwrap_or(std::ptr::null());
                                // Row by row: a 16-row register tile spilled all 32 zmm
                                // to the stack and back (10% of the kernel's samples).
                                for r in 0..32 {
                                    let row = out.add(r * 32);
                                    let acc =
                                        [[_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))]];
                                    store_tile::<Avx512, 1, 2>(
                                        s,
                                        &acc,
                                        cp.add(r * v.n),
                                        v.n,
                                        ep.beta,
                                        bias,
                                        ep.act,
                                    );
                                }
                            } else {
                                store_edge(
                                    out,
                                    32,
                                    tile_rows,
                                    tile_cols,
                                    CPtr::F32(TilePtr(cp)),
                                    v.n,
                                    ep,
                                    jc + jr,
                                );
                            }
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }
}
