//! `kernels/swiglu.cu`: Llama's gated unit `silu(gate)·up`, forward and backward; and their
//! checks.

use scalpel_tensor::cpu::swiglu::{swiglu_backward_reference, swiglu_forward_reference};

use super::{expect_len, grid_stride};
use crate::check::{check, max_rel_error, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("swiglu");

pub fn swiglu_forward(
    rt: &Runtime,
    gate: &DeviceBuffer<f32>,
    up: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = gate.len();
    expect_len(rt, "up", up, n)?;
    expect_len(rt, "y", y, n)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::swiglu_forward_f32(rt, grid_stride(n), n, gate.input(), up.input(), y.output())
    }
}

/// Overwrites `dgate` and `dup`.
pub fn swiglu_backward(
    rt: &Runtime,
    gate: &DeviceBuffer<f32>,
    up: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dgate: &mut DeviceBuffer<f32>,
    dup: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = gate.len();
    for (what, b) in [("up", up), ("dy", dy), ("dgate", &*dgate), ("dup", &*dup)] {
        expect_len(rt, what, b, n)?;
    }
    // SAFETY: lengths checked.
    unsafe {
        launch::swiglu_backward_f32(
            rt,
            grid_stride(n),
            n,
            gate.input(),
            up.input(),
            dy.input(),
            dgate.output(),
            dup.output(),
        )
    }
}

pub fn check_swiglu(rt: &Runtime, n: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("n={n}");
    let mut rng = Inputs::new(14);
    let (gate, up, dy) = (
        rng.uniform(n, -8.0, 8.0),
        rng.uniform(n, -2.0, 2.0),
        rng.uniform(n, -1.0, 1.0),
    );
    let (dgate_in, dup_in, ddy) = (rt.upload(&gate)?, rt.upload(&up)?, rt.upload(&dy)?);
    let mut y = rt.upload(&vec![f32::NAN; n])?;
    swiglu_forward(rt, &dgate_in, &dup_in, &mut y)?;
    let (gate64, up64) = (wide(&gate), wide(&up));
    let mut want = vec![0.0; n];
    swiglu_forward_reference(&gate64, &up64, &mut want);
    let forward = max_rel_error(&y.to_host()?, &want);

    let (mut dgate, mut dup) = (
        rt.upload(&vec![f32::NAN; n])?,
        rt.upload(&vec![f32::NAN; n])?,
    );
    swiglu_backward(rt, &dgate_in, &dup_in, &ddy, &mut dgate, &mut dup)?;
    let (mut want_dgate, mut want_dup) = (vec![0.0; n], vec![0.0; n]);
    swiglu_backward_reference(&gate64, &up64, &wide(&dy), &mut want_dgate, &mut want_dup);
    let backward = worst(&[
        max_rel_error(&dgate.to_host()?, &want_dgate),
        max_rel_error(&dup.to_host()?, &want_dup),
    ]);
    Ok(vec![
        check("swiglu_forward_f32", case.clone(), forward, F32_TOLERANCE),
        check("swiglu_backward_f32", case, backward, F32_TOLERANCE),
    ])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_swiglu(rt, 1037)
}
