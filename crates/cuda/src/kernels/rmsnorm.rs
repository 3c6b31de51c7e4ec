//! `kernels/rmsnorm.cu`: RMSNorm over the last dimension, forward (saving rstd) and backward
//! (dx; dw as a column reduction); and their checks.

use scalpel_tensor::cpu::rmsnorm::{
    rmsnorm_backward_reference, rmsnorm_forward_reference, RmsNormShape,
};

use super::{column_reduction, expect_len, warp_per_row};
use crate::check::{check, max_rel_error, narrow, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("rmsnorm");

/// Saves `rstd` (one per row) for the backward.
pub fn rmsnorm_forward(
    rt: &Runtime,
    s: &RmsNormShape,
    x: &DeviceBuffer<f32>,
    w: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
    rstd: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = s.rows * s.cols;
    expect_len(rt, "x", x, n)?;
    expect_len(rt, "y", y, n)?;
    expect_len(rt, "weight", w, s.cols)?;
    expect_len(rt, "rstd", rstd, s.rows)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::rmsnorm_forward_f32(
            rt,
            warp_per_row(s.rows),
            s.rows,
            s.cols,
            s.eps as f32,
            x.input(),
            w.input(),
            y.output(),
            rstd.output(),
        )
    }
}

/// Overwrites `dx`; accumulates into `dw` (a parameter gradient).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    rt: &Runtime,
    s: &RmsNormShape,
    x: &DeviceBuffer<f32>,
    w: &DeviceBuffer<f32>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
    dw: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = s.rows * s.cols;
    for (what, b, len) in [
        ("x", x, n),
        ("dy", dy, n),
        ("dx", &*dx, n),
        ("weight", w, s.cols),
        ("dw", &*dw, s.cols),
        ("rstd", rstd, s.rows),
    ] {
        expect_len(rt, what, b, len)?;
    }
    // SAFETY: lengths checked.
    unsafe {
        launch::rmsnorm_backward_dx_f32(
            rt,
            warp_per_row(s.rows),
            s.rows,
            s.cols,
            x.input(),
            w.input(),
            rstd.input(),
            dy.input(),
            dx.output(),
        )?;
        launch::rmsnorm_backward_dw_f32(
            rt,
            column_reduction(s.cols),
            s.rows,
            s.cols,
            x.input(),
            rstd.input(),
            dy.input(),
            dw.output(),
        )
    }
}

pub fn check_rmsnorm(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let eps = 1e-5f32;
    let s = RmsNormShape {
        rows,
        cols,
        eps: eps as f64,
    };
    let case = format!("rows={rows} cols={cols}");
    let n = rows * cols;
    let mut rng = Inputs::new(15);
    let x: Vec<f32> = rng.uniform(n, -3.0, 3.0).iter().map(|v| v + 0.5).collect();
    let w = rng.uniform(cols, 0.5, 1.5);
    let dy = rng.uniform(n, -1.0, 1.0);
    let dw0 = rng.uniform(cols, -1.0, 1.0);

    let (dx_in, dw_in) = (rt.upload(&x)?, rt.upload(&w)?);
    let (mut y, mut rstd) = (
        rt.upload(&vec![f32::NAN; n])?,
        rt.upload(&vec![f32::NAN; rows])?,
    );
    rmsnorm_forward(rt, &s, &dx_in, &dw_in, &mut y, &mut rstd)?;
    let (mut want_y, mut want_rstd) = (vec![0.0; n], vec![0.0; rows]);
    let (x64, w64) = (wide(&x), wide(&w));
    rmsnorm_forward_reference(&s, &x64, &w64, &mut want_y, &mut want_rstd);
    let forward = worst(&[
        max_rel_error(&y.to_host()?, &want_y),
        max_rel_error(&rstd.to_host()?, &want_rstd),
    ]);

    // The backward takes the reference's rstd, so it is checked on its own.
    let rstd32 = narrow(&want_rstd);
    let (mut dx, mut dw) = (rt.upload(&vec![f32::NAN; n])?, rt.upload(&dw0)?);
    rmsnorm_backward(
        rt,
        &s,
        &dx_in,
        &dw_in,
        &rt.upload(&rstd32)?,
        &rt.upload(&dy)?,
        &mut dx,
        &mut dw,
    )?;
    let (mut want_dx, mut want_dw) = (vec![0.0; n], wide(&dw0));
    rmsnorm_backward_reference(
        &s,
        &x64,
        &w64,
        &wide(&rstd32),
        &wide(&dy),
        &mut want_dx,
        &mut want_dw,
    );
    Ok(vec![
        check("rmsnorm_forward_f32", case.clone(), forward, F32_TOLERANCE),
        check(
            "rmsnorm_backward_dx_f32",
            case.clone(),
            max_rel_error(&dx.to_host()?, &want_dx),
            F32_TOLERANCE,
        ),
        check(
            "rmsnorm_backward_dw_f32",
            case,
            max_rel_error(&dw.to_host()?, &want_dw),
            F32_TOLERANCE,
        ),
    ])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let mut out = check_rmsnorm(rt, 19, 77)?;
    // A row narrower than a warp leaves lanes idle.
    out.extend(check_rmsnorm(rt, 3, 7)?);
    Ok(out)
}
