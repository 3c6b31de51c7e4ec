//! `kernels/gemm.cu`: `C = act(op(A)·op(B) + bias + beta·C)` on the f32 SIMT path and on tensor
//! cores (f16 or bf16 operands, or f32 operands rounded to TF32; f32 accumulation); and their
//! checks.

use half::{bf16, f16};
use scalpel_tensor::cpu::activation::gelu_forward_reference;
use scalpel_tensor::cpu::gemm::{gemm_reference, Activation, GemmShape};

use super::elementwise::{self, launch as elementwise_launch};
use super::{div_ceil, expect_len, expect_len_at};
use crate::check::{
    check, max_rel_error, wide, Inputs, KernelCheck, F32_TOLERANCE, HALF_TOLERANCE, TF32_TOLERANCE,
};
use crate::{DeviceBuffer, DeviceElement, DeviceIn, DeviceOut, LaunchConfig, Result, Runtime};

launchers!("gemm");

/// The launcher type every GEMM entry point shares: `(m, n, k, a, b, bias, gelu, pre_gelu, c,
/// beta)`.
pub type GemmLauncher<T> = unsafe fn(
    &Runtime,
    LaunchConfig,
    usize,
    usize,
    usize,
    DeviceIn<'_, T>,
    DeviceIn<'_, T>,
    DeviceIn<'_, f32>,
    u32,
    DeviceOut<'_, f32>,
    DeviceOut<'_, f32>,
    f32,
) -> Result<()>;

/// What a GEMM does to each element of C as it stores it (gemm.cu's `gemm_store`), as the CPU
/// GEMM's epilogue: `C = act(op(A)·op(B) + bias + beta·C)`.
pub struct Epilogue<'a> {
    /// One value per column of C, added to every row.
    pub bias: Option<&'a DeviceBuffer<f32>>,
    /// The scale of C's old value; 0 overwrites C without reading it.
    pub beta: f32,
    pub activation: Activation,
    /// With [`Activation::Gelu`]: receives the values before the activation (its backward's input).
    pub pre_activation: Option<&'a mut DeviceBuffer<f32>>,
}

impl<'a> Epilogue<'a> {
    /// `C = op(A)·op(B)`.
    pub fn overwrite() -> Epilogue<'a> {
        Epilogue::bias(None)
    }

    /// `C = op(A)·op(B) + bias`.
    pub fn bias(bias: Option<&'a DeviceBuffer<f32>>) -> Epilogue<'a> {
        Epilogue {
            bias,
            beta: 0.0,
            activation: Activation::Identity,
            pre_activation: None,
        }
    }
}

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
    ep: Epilogue,
) -> Result<()> {
    expect_len_at(rt, "A", a, a_at, s.m * s.k)?;
    expect_len_at(rt, "B", b, b_at, s.k * s.n)?;
    expect_len_at(rt, "C", c, c_at, s.m * s.n)?;
    if let Some(bias) = ep.bias {
        expect_len(rt, "bias", bias, s.n)?;
    }
    let gelu = matches!(ep.activation, Activation::Gelu);
    if let Some(pre) = &ep.pre_activation {
        if !gelu {
            return Err(crate::CudaError::Shape(
                "gemm: a pre-activation output needs an activation".into(),
            ));
        }
        expect_len(rt, "pre-activation", pre, s.m * s.n)?;
    }
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
            ep.bias.map_or(DeviceIn::null(), DeviceBuffer::input),
            gelu as u32,
            ep.pre_activation
                .map_or(DeviceOut::null(), DeviceBuffer::output),
            c.output_at(c_at)?,
            ep.beta,
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
    gemm_launch(rt, F32_KERNEL, s, a, b, c, Epilogue::overwrite())
}

/// `C = act(op(A)·op(B) + bias + beta·C)` in f32 (see [`Epilogue`]).
pub fn gemm(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    c: &mut DeviceBuffer<f32>,
    ep: Epilogue,
) -> Result<()> {
    gemm_whole(rt, F32_KERNEL, s, a, b, c, ep)
}

/// [`gemm`] on tensor cores with the f32 operands rounded to TF32 (10-bit mantissa, to nearest,
/// ties away from zero) as they are loaded; f32 accumulation and output.
pub fn gemm_tf32(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    c: &mut DeviceBuffer<f32>,
    ep: Epilogue,
) -> Result<()> {
    gemm_whole(rt, tensor_core(&GEMM_TF32), s, a, b, c, ep)
}

/// [`gemm`] on tensor cores: f16 or bf16 operands, f32 accumulation and output.
pub fn gemm_half<T: HalfElement>(
    rt: &Runtime,
    s: GemmShape,
    a: &DeviceBuffer<T>,
    b: &DeviceBuffer<T>,
    c: &mut DeviceBuffer<f32>,
    ep: Epilogue,
) -> Result<()> {
    gemm_whole(rt, tensor_core(&T::GEMM), s, a, b, c, ep)
}

/// [`gemm_launch`] on buffers that are exactly the matrices.
fn gemm_whole<T: DeviceElement>(
    rt: &Runtime,
    kernel: GemmKernel<T>,
    s: GemmShape,
    a: &DeviceBuffer<T>,
    b: &DeviceBuffer<T>,
    c: &mut DeviceBuffer<f32>,
    ep: Epilogue,
) -> Result<()> {
    expect_len(rt, "A", a, s.m * s.k)?;
    expect_len(rt, "B", b, s.k * s.n)?;
    expect_len(rt, "C", c, s.m * s.n)?;
    gemm_launch(rt, kernel, s, (a, 0), (b, 0), (c, 0), ep)
}

/// One GEMM check: the shape, beta, whether a bias is added and whether GELU follows (its
/// pre-activation output checked too).
#[derive(Clone, Copy, Debug)]
pub struct GemmCase {
    pub s: GemmShape,
    pub beta: f32,
    pub bias: bool,
    pub gelu: bool,
}

impl GemmCase {
    fn name(&self) -> String {
        let s = self.s;
        format!(
            "m={} n={} k={} beta={}{}{}",
            s.m,
            s.n,
            s.k,
            self.beta,
            if self.bias { " bias" } else { "" },
            if self.gelu { " gelu" } else { "" }
        )
    }
}

/// Random A, B, bias (if the case has one) and C.
struct GemmInputs {
    case: GemmCase,
    a: Vec<f32>,
    b: Vec<f32>,
    bias: Option<Vec<f32>>,
    c: Vec<f32>,
}

/// A GEMM under test, on f32 device operands A and B, writing C through the epilogue.
type GemmUnderTest<'f> = dyn FnOnce(&DeviceBuffer<f32>, &DeviceBuffer<f32>, &mut DeviceBuffer<f32>, Epilogue) -> Result<()>
    + 'f;

impl GemmInputs {
    fn new(case: GemmCase, seed: u64) -> Self {
        let s = case.s;
        let mut rng = Inputs::new(seed);
        GemmInputs {
            case,
            a: rng.uniform(s.m * s.k, -1.0, 1.0),
            b: rng.uniform(s.k * s.n, -1.0, 1.0),
            bias: case.bias.then(|| rng.uniform(s.n, -1.0, 1.0)),
            c: rng.uniform(s.m * s.n, -1.0, 1.0),
        }
    }

    /// The f64 reference on `round`ed A and B: `(op(A)·op(B) + bias + beta·C, C)`, C being the
    /// first with GELU applied (if the case has it).
    fn reference(&self, round: fn(f32) -> f32) -> (Vec<f64>, Vec<f64>) {
        let rounded = |x: &[f32]| x.iter().map(|&v| round(v) as f64).collect::<Vec<_>>();
        let s = self.case.s;
        let mut pre = wide(&self.c);
        gemm_reference(
            s,
            &rounded(&self.a),
            &rounded(&self.b),
            &mut pre,
            self.case.beta as f64,
        );
        if let Some(bias) = &self.bias {
            for row in pre.chunks_mut(s.n) {
                row.iter_mut().zip(bias).for_each(|(w, &b)| *w += b as f64);
            }
        }
        let mut c = pre.clone();
        if self.case.gelu {
            gelu_forward_reference(&mut c);
        }
        (pre, c)
    }

    /// Runs `gemm` on the inputs uploaded and reads back C and, with GELU, the pre-activation.
    fn run(&self, rt: &Runtime, gemm: Box<GemmUnderTest>) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let bias = self.bias.as_deref().map(|b| rt.upload(b)).transpose()?;
        let mut c = rt.upload(&self.c)?;
        let mut pre = if self.case.gelu {
            Some(rt.upload(&vec![f32::NAN; self.c.len()])?)
        } else {
            None
        };
        let ep = Epilogue {
            bias: bias.as_ref(),
            beta: self.case.beta,
            activation: if self.case.gelu {
                Activation::Gelu
            } else {
                Activation::Identity
            },
            pre_activation: pre.as_mut(),
        };
        gemm(&rt.upload(&self.a)?, &rt.upload(&self.b)?, &mut c, ep)?;
        Ok((c.to_host()?, pre.map(|p| p.to_host()).transpose()?))
    }

    /// Checks of `got` (C and the pre-activation) against the reference on `round`ed operands.
    fn checks(
        &self,
        kernel: &str,
        what: &str,
        got: &(Vec<f32>, Option<Vec<f32>>),
        round: fn(f32) -> f32,
        tolerance: f64,
    ) -> Vec<KernelCheck> {
        let (want_pre, want) = self.reference(round);
        let case = format!("{}{what}", self.case.name());
        let mut out = vec![check(
            kernel,
            case.clone(),
            max_rel_error(&got.0, &want),
            tolerance,
        )];
        if let Some(pre) = &got.1 {
            out.push(check(
                kernel,
                format!("{case}, pre-activation"),
                max_rel_error(pre, &want_pre),
                tolerance,
            ));
        }
        out
    }
}

pub fn check_f32(rt: &Runtime, case: GemmCase) -> Result<Vec<KernelCheck>> {
    let inputs = GemmInputs::new(case, 1);
    let got = inputs.run(rt, Box::new(|a, b, c, ep| gemm(rt, case.s, a, b, c, ep)))?;
    let kernel = format!("gemm_f32_{}", VARIANTS[variant(case.s)]);
    Ok(inputs.checks(&kernel, "", &got, |x| x, F32_TOLERANCE))
}

pub fn check_half<T: HalfElement>(rt: &Runtime, case: GemmCase) -> Result<Vec<KernelCheck>> {
    let kernel = format!("gemm_{}_{}", T::NAME, VARIANTS[variant(case.s)]);
    check_tensor_core(
        rt,
        case,
        &kernel,
        T::round,
        HALF_TOLERANCE,
        Box::new(|a, b, c, ep| {
            let (mut ha, mut hb) = (rt.uninit::<T>(a.len())?, rt.uninit::<T>(b.len())?);
            elementwise::cast(rt, a, &mut ha)?;
            elementwise::cast(rt, b, &mut hb)?;
            gemm_half(rt, case.s, &ha, &hb, c, ep)
        }),
    )
}

pub fn check_tf32(rt: &Runtime, case: GemmCase) -> Result<Vec<KernelCheck>> {
    let kernel = format!("gemm_tf32_{}", VARIANTS[variant(case.s)]);
    check_tensor_core(
        rt,
        case,
        &kernel,
        round_to_tf32,
        TF32_TOLERANCE,
        Box::new(|a, b, c, ep| gemm_tf32(rt, case.s, a, b, c, ep)),
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

/// A tensor-core GEMM (`run` on f32 device operands) against two f64 references: the product of
/// the operands rounded as the kernel rounds them (`round`), which only the f32 accumulation may
/// miss (F32_TOLERANCE), and the product of the f32 operands, which the rounding misses by up to
/// `tolerance`.
fn check_tensor_core(
    rt: &Runtime,
    case: GemmCase,
    kernel: &str,
    round: fn(f32) -> f32,
    tolerance: f64,
    run: Box<GemmUnderTest>,
) -> Result<Vec<KernelCheck>> {
    let inputs = GemmInputs::new(case, 2);
    let got = inputs.run(rt, run)?;
    let mut out = inputs.checks(
        kernel,
        ", operands rounded on the host",
        &got,
        round,
        F32_TOLERANCE,
    );
    out.extend(inputs.checks(kernel, ", f32 operands", &got, |x| x, tolerance));
    Ok(out)
}

/// The standard GEMM checks: every transpose combination at ragged sizes, with a bias and GELU
/// (keeping the pre-activation), and accumulating into C.
fn standard_cases() -> Vec<GemmCase> {
    let mut cases = Vec::new();
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        let shape = |m, n, k| GemmShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
        };
        cases.push(GemmCase {
            s: shape(70, 83, 45),
            beta: 0.0,
            bias: true,
            gelu: true,
        });
        cases.push(GemmCase {
            s: shape(33, 65, 17),
            beta: 0.5,
            bias: false,
            gelu: false,
        });
    }
    cases
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for case in standard_cases() {
        out.extend(check_f32(rt, case)?);
        out.extend(check_half::<f16>(rt, case)?);
        out.extend(check_half::<bf16>(rt, case)?);
        out.extend(check_tf32(rt, case)?);
    }
    Ok(out)
}
