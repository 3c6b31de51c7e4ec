//! `kernels/gemm.cu`: `C = op(A)·op(B) + beta·C` on the f32 SIMT path and on tensor cores (f16 or
//! bf16 operands, or f32 operands rounded to TF32; f32 accumulation); and their checks.

use half::{bf16, f16};
use scalpel_tensor::cpu::gemm::{gemm_reference, GemmShape};

use super::elementwise::{self, launch as elementwise_launch};
use super::{div_ceil, expect_len, expect_len_at};
use crate::check::{
    check, max_rel_error, wide, Inputs, KernelCheck, F32_TOLERANCE, HALF_TOLERANCE, TF32_TOLERANCE,
};
use crate::{DeviceBuffer, DeviceElement, DeviceIn, DeviceOut, LaunchConfig, Result, Runtime};

launchers!("gemm");

/// The launcher type every GEMM entry point shares: `(m, n, k, a, b, c, beta)`.
pub type GemmLauncher<T> = unsafe fn(
    &Runtime,
    LaunchConfig,
    usize,
    usize,
    usize,
    DeviceIn<'_, T>,
    DeviceIn<'_, T>,
    DeviceOut<'_, f32>,
    f32,
) -> Result<()>;

/// The launcher type of the f32 → `T` casts: `(n, x, y)`.
pub type CastLauncher<T> =
    unsafe fn(&Runtime, LaunchConfig, usize, DeviceIn<'_, f32>, DeviceOut<'_, T>) -> Result<()>;

/// The transpose variants in the order of the launcher arrays (first letter A, second B).
const VARIANTS: [&str; 4] = ["nn", "nt", "tn", "tt"];

fn variant(s: GemmShape) -> usize {
    2 * s.trans_a as usize + s.trans_b as usize
}

/// Half-precision element types the tensor-core GEMM takes.
pub trait HalfElement: DeviceElement {
    /// The kernels' type suffix: `gemm_{NAME}_nn`, `cast_f32_to_{NAME}`.
    const NAME: &'static str;
    /// `gemm_{NAME}_{nn,nt,tn,tt}`.
    const GEMM: [GemmLauncher<Self>; 4];
    const CAST: CastLauncher<Self>;
    /// `x` rounded to this type and back, on the host (as the cast kernels round).
    fn round(x: f32) -> f32;
}

impl HalfElement for f16 {
    const NAME: &'static str = "f16";
    const GEMM: [GemmLauncher<f16>; 4] = [
        launch::gemm_f16_nn,
        launch::gemm_f16_nt,
        launch::gemm_f16_tn,
        launch::gemm_f16_tt,
    ];
    const CAST: CastLauncher<f16> = elementwise_launch::cast_f32_to_f16;
    fn round(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
}

impl HalfElement for bf16 {
    const NAME: &'static str = "bf16";
    const GEMM: [GemmLauncher<bf16>; 4] = [
        launch::gemm_bf16_nn,
        launch::gemm_bf16_nt,
        launch::gemm_bf16_tn,
        launch::gemm_bf16_tt,
    ];
    const CAST: CastLauncher<bf16> = elementwise_launch::cast_f32_to_bf16;
    fn round(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }
}

const GEMM_F32: [GemmLauncher<f32>; 4] = [
    launch::gemm_f32_nn,
    launch::gemm_f32_nt,
    launch::gemm_f32_tn,
    launch::gemm_f32_tt,
];

/// A GEMM kernel family: its four transpose variants, square block tiles of `tile`.
struct GemmKernel<T: DeviceElement> {
    variants: &'static [GemmLauncher<T>; 4],
    tile: usize,
    threads: u32,
}

/// A tensor-core family: `WMMA_BM`/`WMMA_BN` and `WMMA_THREADS` of gemm.cu.
fn tensor_core<T: DeviceElement>(variants: &'static [GemmLauncher<T>; 4]) -> GemmKernel<T> {
    GemmKernel {
        variants,
        tile: 64,
        threads: 128,
    }
}

const GEMM_TF32: [GemmLauncher<f32>; 4] = [
    launch::gemm_tf32_nn,
    launch::gemm_tf32_nt,
    launch::gemm_tf32_tn,
    launch::gemm_tf32_tt,
];

/// A matrix operand: a buffer and the element offset of the matrix in it (a batch's i-th).
type Operand<'a, B> = (B, usize);

fn gemm_launch<T: DeviceElement>(
    rt: &Runtime,
    kernel: GemmKernel<T>,
    s: GemmShape,
    (a, a_at): Operand<&DeviceBuffer<T>>,
    (b, b_at): Operand<&DeviceBuffer<T>>,
    (c, c_at): Operand<&mut DeviceBuffer<f32>>,
    beta: f32,
) -> Result<()> {
    expect_len_at(rt, "A", a, a_at, s.m * s.k)?;
    expect_len_at(rt, "B", b, b_at, s.k * s.n)?;
    expect_len_at(rt, "C", c, c_at, s.m * s.n)?;
    if s.m == 0 || s.n == 0 {
        return Ok(());
    }
    let config = LaunchConfig {
        grid: [div_ceil(s.n, kernel.tile), div_ceil(s.m, kernel.tile), 1],
        block: [kernel.threads, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: each matrix checked to lie inside its buffer; the grid covers C in tiles.
    unsafe {
        (kernel.variants[variant(s)])(
            rt,
            config,
            s.m,
            s.n,
            s.k,
            a.input_at(a_at)?,
            b.input_at(b_at)?,
            c.output_at(c_at)?,
            beta,
        )
    }
}

const F32_KERNEL: GemmKernel<f32> = GemmKernel {
    variants: &GEMM_F32,
    tile: 64,
    threads: 256,
};

/// [`gemm`] on matrices inside larger buffers (one matrix of a batch each), `beta` = 0.
pub fn gemm_at(
    rt: &Runtime,
    s: GemmShape,
    a: Operand<&DeviceBuffer<f32>>,
    b: Operand<&DeviceBuffer<f32>>,
    c: Operand<&mut DeviceBuffer<f32>>,
) -> Result<()> {
    gemm_launch(rt, F32_KERNEL, s, a, b, c, 0.0)
}

/// `C = op(A)·op(B) + beta·C` in f32 (beta = 0 overwrites C without reading it).
pub fn gemm(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    c: &mut DeviceBuffer<f32>,
    beta: f32,
) -> Result<()> {
    gemm_whole(rt, F32_KERNEL, s, a, b, c, beta)
}

/// [`gemm`] on tensor cores with the f32 operands rounded to TF32 (10-bit mantissa, to nearest,
/// ties away from zero) as they are loaded; f32 accumulation and output.
pub fn gemm_tf32(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    c: &mut DeviceBuffer<f32>,
    beta: f32,
) -> Result<()> {
    gemm_whole(rt, tensor_core(&GEMM_TF32), s, a, b, c, beta)
}

/// [`gemm`] on tensor cores: f16 or bf16 operands, f32 accumulation and output.
pub fn gemm_half<T: HalfElement>(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<T>,
    b: &DeviceBuffer<T>,
    c: &mut DeviceBuffer<f32>,
    beta: f32,
) -> Result<()> {
    gemm_whole(rt, tensor_core(&T::GEMM), s, a, b, c, beta)
}

/// [`gemm_launch`] on buffers that are exactly the matrices.
fn gemm_whole<T: DeviceElement>(
    rt: &Runtime,
    kernel: GemmKernel<T>,
    s: GemmShape,
    a: &DeviceBuffer<T>,
    b: &DeviceBuffer<T>,
    c: &mut DeviceBuffer<f32>,
    beta: f32,
) -> Result<()> {
    expect_len(rt, "A", a, s.m * s.k)?;
    expect_len(rt, "B", b, s.k * s.n)?;
    expect_len(rt, "C", c, s.m * s.n)?;
    gemm_launch(rt, kernel, s, (a, 0), (b, 0), (c, 0), beta)
}

fn gemm_case(s: GemmShape, beta: f32) -> String {
    format!("m={} n={} k={} beta={beta}", s.m, s.n, s.k)
}

/// Random A, B, C and the f64 reference result.
fn gemm_inputs(s: GemmShape, beta: f32, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f64>) {
    let mut rng = Inputs::new(seed);
    let a = rng.uniform(s.m * s.k, -1.0, 1.0);
    let b = rng.uniform(s.k * s.n, -1.0, 1.0);
    let c = rng.uniform(s.m * s.n, -1.0, 1.0);
    let mut want = wide(&c);
    gemm_reference(s, &wide(&a), &wide(&b), &mut want, beta as f64);
    (a, b, c, want)
}

pub fn check_f32(rt: &Runtime, s: GemmShape, beta: f32) -> Result<KernelCheck> {
    let (a, b, c, want) = gemm_inputs(s, beta, 1);
    let (da, db, mut dc) = (rt.upload(&a)?, rt.upload(&b)?, rt.upload(&c)?);
    gemm(rt, s, &da, &db, &mut dc, beta)?;
    Ok(check(
        &format!("gemm_f32_{}", VARIANTS[variant(s)]),
        gemm_case(s, beta),
        max_rel_error(&dc.to_host()?, &want),
        F32_TOLERANCE,
    ))
}

pub fn check_half<T: HalfElement>(
    rt: &Runtime,
    s: GemmShape,
    beta: f32,
) -> Result<Vec<KernelCheck>> {
    let kernel = format!("gemm_{}_{}", T::NAME, VARIANTS[variant(s)]);
    check_tensor_core(rt, s, beta, &kernel, T::round, HALF_TOLERANCE, |a, b, c| {
        let (mut ha, mut hb) = (rt.uninit::<T>(a.len())?, rt.uninit::<T>(b.len())?);
        elementwise::cast(rt, a, &mut ha)?;
        elementwise::cast(rt, b, &mut hb)?;
        gemm_half(rt, s, &ha, &hb, c, beta)
    })
}

pub fn check_tf32(rt: &Runtime, s: GemmShape, beta: f32) -> Result<Vec<KernelCheck>> {
    let kernel = format!("gemm_tf32_{}", VARIANTS[variant(s)]);
    check_tensor_core(
        rt,
        s,
        beta,
        &kernel,
        round_to_tf32,
        TF32_TOLERANCE,
        |a, b, c| gemm_tf32(rt, s, a, b, c, beta),
    )
}

/// `cvt.rna.tf32.f32` on the host: to the nearest value with a 10-bit mantissa, ties away from
/// zero (adding half an ulp to the magnitude bits, then clearing the low 13).
fn round_to_tf32(x: f32) -> f32 {
    let bits = x.to_bits();
    if bits & 0x7f80_0000 == 0x7f80_0000 {
        return x; // infinities and NaN
    }
    f32::from_bits((bits + 0x1000) & 0xffff_e000)
}

/// A tensor-core GEMM (`run` on f32 device operands A, B and C) against two f64 references:
/// the product of the operands rounded as the kernel rounds them (`round`), which only the f32
/// accumulation may miss (F32_TOLERANCE), and the product of the f32 operands, which the rounding
/// misses by up to `tolerance`.
fn check_tensor_core(
    rt: &Runtime,
    s: GemmShape,
    beta: f32,
    kernel: &str,
    round: fn(f32) -> f32,
    tolerance: f64,
    run: impl FnOnce(&DeviceBuffer<f32>, &DeviceBuffer<f32>, &mut DeviceBuffer<f32>) -> Result<()>,
) -> Result<Vec<KernelCheck>> {
    let (a, b, c, want) = gemm_inputs(s, beta, 2);
    let mut dc = rt.upload(&c)?;
    run(&rt.upload(&a)?, &rt.upload(&b)?, &mut dc)?;
    let got = dc.to_host()?;
    let rounded = |x: &[f32]| x.iter().map(|&v| round(v) as f64).collect::<Vec<_>>();
    let mut want_rounded = wide(&c);
    gemm_reference(
        s,
        &rounded(&a),
        &rounded(&b),
        &mut want_rounded,
        beta as f64,
    );
    Ok(vec![
        check(
            kernel,
            format!("{}, operands rounded on the host", gemm_case(s, beta)),
            max_rel_error(&got, &want_rounded),
            F32_TOLERANCE,
        ),
        check(
            kernel,
            format!("{}, f32 operands", gemm_case(s, beta)),
            max_rel_error(&got, &want),
            tolerance,
        ),
    ])
}

/// Shapes of the standard GEMM checks: every transpose combination at ragged sizes, with and
/// without accumulation into C.
fn standard_shapes() -> Vec<(GemmShape, f32)> {
    let mut shapes = Vec::new();
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        shapes.push((
            GemmShape {
                m: 70,
                n: 83,
                k: 45,
                trans_a,
                trans_b,
            },
            0.0,
        ));
        shapes.push((
            GemmShape {
                m: 33,
                n: 65,
                k: 17,
                trans_a,
                trans_b,
            },
            0.5,
        ));
    }
    shapes
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for (s, beta) in standard_shapes() {
        out.push(check_f32(rt, s, beta)?);
        out.extend(check_half::<f16>(rt, s, beta)?);
        out.extend(check_half::<bf16>(rt, s, beta)?);
        out.extend(check_tf32(rt, s, beta)?);
    }
    Ok(out)
}
