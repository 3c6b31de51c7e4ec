//! `kernels/gelu.cu`: exact (erf) GELU forward and backward; and their checks.

use scalpel_tensor::cpu::activation;

use super::{expect_len, grid_stride};
use crate::check::{check, max_rel_error, wide, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("gelu");

pub fn gelu_forward(rt: &Runtime, x: &DeviceBuffer<f32>, y: &mut DeviceBuffer<f32>) -> Result<()> {
    let n = x.len();
    expect_len(rt, "y", y, n)?;
    // SAFETY: lengths checked.
    unsafe { launch::gelu_forward_f32(rt, grid_stride(n), n, x.input(), y.output()) }
}

/// Overwrites `dx`.
pub fn gelu_backward(
    rt: &Runtime,
    x: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = x.len();
    expect_len(rt, "dy", dy, n)?;
    expect_len(rt, "dx", dx, n)?;
    // SAFETY: lengths checked.
    unsafe { launch::gelu_backward_f32(rt, grid_stride(n), n, x.input(), dy.input(), dx.output()) }
}

pub fn check_gelu(rt: &Runtime, n: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("n={n}");
    let mut rng = Inputs::new(5);
    let (x, dy) = (rng.uniform(n, -5.0, 5.0), rng.uniform(n, -1.0, 1.0));
    let (dx_in, ddy) = (rt.upload(&x)?, rt.upload(&dy)?);
    let mut y = rt.zeros(n)?;
    gelu_forward(rt, &dx_in, &mut y)?;
    let mut want = wide(&x);
    activation::gelu_forward_reference(&mut want);
    let forward = check(
        "gelu_forward_f32",
        case.clone(),
        max_rel_error(&y.to_host()?, &want),
        F32_TOLERANCE,
    );
    let mut dx = rt.upload(&vec![f32::NAN; n])?;
    gelu_backward(rt, &dx_in, &ddy, &mut dx)?;
    activation::gelu_backward_reference(&wide(&x), &wide(&dy), &mut want);
    let backward = check(
        "gelu_backward_f32",
        case,
        max_rel_error(&dx.to_host()?, &want),
        F32_TOLERANCE,
    );
    Ok(vec![forward, backward])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_gelu(rt, 1037)
}
