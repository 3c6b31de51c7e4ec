//! `kernels/elementwise.cu`: add, axpy, scale, the bias gradient, the f32 → f16/bf16
//! casts that feed the tensor-core GEMM; and their checks.

use half::{bf16, f16};
use scalpel_tensor::cpu::elementwise;

use super::gemm::HalfElement;
use super::{column_reduction, expect_len, expect_len_at, grid_stride, rows_of};
use crate::check::{check, max_rel_error, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("elementwise");

/// `out = a + b`.
pub fn add(
    rt: &Runtime,
    a: &DeviceBuffer<f32>,
    b: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = a.len();
    expect_len(rt, "b", b, n)?;
    expect_len(rt, "out", out, n)?;
    // SAFETY: lengths checked.
    unsafe { launch::add_f32(rt, grid_stride(n), n, a.input(), b.input(), out.output()) }
}

/// `y += alpha·x`.
pub fn axpy(
    rt: &Runtime,
    alpha: f32,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = x.len();
    expect_len(rt, "y", y, n)?;
    // SAFETY: lengths checked.
    unsafe { launch::axpy_f32(rt, grid_stride(n), n, alpha, x.input(), y.output()) }
}

/// `y[y_at..][..n] += alpha·x[x_at..][..n]`: row copies into zeros (`Tensor::concat` and
/// `Tensor::rows` on a device, a KV cache's growth) without a kernel of their own.
pub fn axpy_at(
    rt: &Runtime,
    alpha: f32,
    n: usize,
    (x, x_at): (&DeviceBuffer<f32>, usize),
    (y, y_at): (&mut DeviceBuffer<f32>, usize),
) -> Result<()> {
    expect_len_at(rt, "x", x, x_at, n)?;
    expect_len_at(rt, "y", y, y_at, n)?;
    if n == 0 {
        return Ok(());
    }
    // SAFETY: both ranges checked to lie in their buffers.
    unsafe {
        launch::axpy_f32(
            rt,
            grid_stride(n),
            n,
            alpha,
            x.input_at(x_at)?,
            y.output_at(y_at)?,
        )
    }
}

/// `x *= alpha`.
pub fn scale(rt: &Runtime, alpha: f32, x: &mut DeviceBuffer<f32>) -> Result<()> {
    let n = x.len();
    x.check_runtime(rt)?;
    // SAFETY: `n` is the buffer's length.
    unsafe { launch::scale_f32(rt, grid_stride(n), n, alpha, x.output()) }
}

/// `dbias += Σ_rows dy`.
pub fn bias_backward(
    rt: &Runtime,
    cols: usize,
    dy: &DeviceBuffer<f32>,
    dbias: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("dy", dy.len(), cols)?;
    expect_len(rt, "dbias", dbias, cols)?;
    dy.check_runtime(rt)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::bias_backward_f32(
            rt,
            column_reduction(cols),
            rows,
            cols,
            dy.input(),
            dbias.output(),
        )
    }
}

/// Rounds `x` to `T` elementwise on the device.
pub fn cast<T: HalfElement>(
    rt: &Runtime,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<T>,
) -> Result<()> {
    let n = x.len();
    expect_len(rt, "y", y, n)?;
    // SAFETY: lengths checked.
    unsafe { (T::CAST)(rt, grid_stride(n), n, x.input(), y.output()) }
}

/// The casts must round to nearest even exactly as the `half` crate does (tolerance 0), on
/// large values and on values that are subnormal in f16.
pub fn check_casts(rt: &Runtime, n: usize) -> Result<Vec<KernelCheck>> {
    fn one<T: HalfElement + Into<f64>>(
        rt: &Runtime,
        x: &[f32],
        round: impl Fn(f32) -> T,
    ) -> Result<f64> {
        let mut y = rt.zeros::<T>(x.len())?;
        cast(rt, &rt.upload(x)?, &mut y)?;
        let got: Vec<f32> = y.to_host()?.into_iter().map(|v| v.into() as f32).collect();
        let want: Vec<f64> = x.iter().map(|&v| round(v).into()).collect();
        Ok(max_rel_error(&got, &want))
    }
    let mut rng = Inputs::new(3);
    let (large, tiny) = (
        rng.uniform(n, -60000.0, 60000.0),
        rng.uniform(n, -1e-4, 1e-4),
    );
    let case = format!("n={n}, |x| < 60000 and |x| < 1e-4");
    Ok(vec![
        check(
            &format!("cast_f32_to_{}", f16::NAME),
            case.clone(),
            worst(&[
                one(rt, &large, f16::from_f32)?,
                one(rt, &tiny, f16::from_f32)?,
            ]),
            0.0,
        ),
        check(
            &format!("cast_f32_to_{}", bf16::NAME),
            case,
            worst(&[
                one(rt, &large, bf16::from_f32)?,
                one(rt, &tiny, bf16::from_f32)?,
            ]),
            0.0,
        ),
    ])
}

pub fn check_elementwise(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let n = rows * cols;
    let case = format!("rows={rows} cols={cols}");
    let mut rng = Inputs::new(4);
    let (a, b) = (rng.uniform(n, -2.0, 2.0), rng.uniform(n, -2.0, 2.0));
    let bias = rng.uniform(cols, -1.0, 1.0);
    let (da, db) = (rt.upload(&a)?, rt.upload(&b)?);
    let mut out = Vec::new();

    let mut got = rt.zeros(n)?;
    add(rt, &da, &db, &mut got)?;
    let mut want = vec![0.0; n];
    elementwise::add(&wide(&a), &wide(&b), &mut want);
    out.push(check(
        "add_f32",
        case.clone(),
        max_rel_error(&got.to_host()?, &want),
        F32_TOLERANCE,
    ));

    let mut y = rt.upload(&b)?;
    axpy(rt, 0.7, &da, &mut y)?;
    let mut want = wide(&b);
    elementwise::axpy(0.7f32 as f64, &wide(&a), &mut want);
    out.push(check(
        "axpy_f32",
        case.clone(),
        max_rel_error(&y.to_host()?, &want),
        F32_TOLERANCE,
    ));

    let mut x = rt.upload(&a)?;
    scale(rt, -1.3, &mut x)?;
    let mut want = wide(&a);
    elementwise::scale(-1.3f32 as f64, &mut want);
    out.push(check(
        "scale_f32",
        case.clone(),
        max_rel_error(&x.to_host()?, &want),
        F32_TOLERANCE,
    ));

    // Accumulates: start from a non-zero gradient.
    let mut dbias = rt.upload(&bias)?;
    bias_backward(rt, cols, &da, &mut dbias)?;
    let mut want = wide(&bias);
    elementwise::bias_backward(cols, &wide(&a), &mut want);
    out.push(check(
        "bias_backward_f32",
        case,
        max_rel_error(&dbias.to_host()?, &want),
        F32_TOLERANCE,
    ));
    Ok(out)
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let mut out = check_casts(rt, 1031)?;
    out.extend(check_elementwise(rt, 37, 45)?);
    Ok(out)
}
