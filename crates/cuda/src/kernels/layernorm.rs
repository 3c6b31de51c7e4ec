//! `kernels/layernorm.cu`: LayerNorm over the last dimension, forward (saving mean and rstd; with a
//! residual added first) and backward (dx; dgamma and dbeta as column reductions); and their checks.

use scalpel_tensor::cpu::layernorm::{
    layernorm_backward_reference, layernorm_forward_reference, LayerNormShape,
};

use super::{column_reduction, expect_len, warp_per_row};
use crate::check::{check, max_rel_error, narrow, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("layernorm");

/// A residual added before the normalisation: the residual, and the buffer receiving the sum.
pub type Residual<'a> = (&'a DeviceBuffer<f32>, &'a mut DeviceBuffer<f32>);

/// `y = LayerNorm(x)`, or with a residual `LayerNorm(x + residual)` storing the sum (the
/// backward's input); saves `mean` and `rstd` (one per row) for the backward.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    rt: &Runtime,
    s: &LayerNormShape,
    x: &DeviceBuffer<f32>,
    residual: Option<Residual>,
    gamma: &DeviceBuffer<f32>,
    beta: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
    mean: &mut DeviceBuffer<f32>,
    rstd: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = s.rows * s.cols;
    expect_len(rt, "x", x, n)?;
    expect_len(rt, "y", y, n)?;
    expect_len(rt, "gamma", gamma, s.cols)?;
    expect_len(rt, "beta", beta, s.cols)?;
    expect_len(rt, "mean", mean, s.rows)?;
    expect_len(rt, "rstd", rstd, s.rows)?;
    let config = warp_per_row(s.rows);
    let eps = s.eps as f32;
    let (g, b) = (gamma.input(), beta.input());
    // SAFETY: lengths checked.
    unsafe {
        match residual {
            None => launch::layernorm_forward_f32(
                rt,
                config,
                s.rows,
                s.cols,
                eps,
                x.input(),
                g,
                b,
                y.output(),
                mean.output(),
                rstd.output(),
            ),
            Some((residual, sum)) => {
                expect_len(rt, "residual", residual, n)?;
                expect_len(rt, "sum", sum, n)?;
                launch::add_layernorm_forward_f32(
                    rt,
                    config,
                    s.rows,
                    s.cols,
                    eps,
                    x.input(),
                    residual.input(),
                    g,
                    b,
                    sum.output(),
                    y.output(),
                    mean.output(),
                    rstd.output(),
                )
            }
        }
    }
}

/// Overwrites `dx`; accumulates into `dgamma` and `dbeta` (parameter gradients).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    rt: &Runtime,
    s: &LayerNormShape,
    x: &DeviceBuffer<f32>,
    gamma: &DeviceBuffer<f32>,
    mean: &DeviceBuffer<f32>,
    rstd: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
    dgamma: &mut DeviceBuffer<f32>,
    dbeta: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = s.rows * s.cols;
    for (what, b, len) in [
        ("x", x, n),
        ("dy", dy, n),
        ("dx", &*dx, n),
        ("gamma", gamma, s.cols),
    ] {
        expect_len(rt, what, b, len)?;
    }
    for (what, b, len) in [
        ("mean", mean, s.rows),
        ("rstd", rstd, s.rows),
        ("dgamma", &*dgamma, s.cols),
        ("dbeta", &*dbeta, s.cols),
    ] {
        expect_len(rt, what, b, len)?;
    }
    // SAFETY: lengths checked.
    unsafe {
        launch::layernorm_backward_dx_f32(
            rt,
            warp_per_row(s.rows),
            s.rows,
            s.cols,
            x.input(),
            gamma.input(),
            mean.input(),
            rstd.input(),
            dy.input(),
            dx.output(),
        )?;
        launch::layernorm_backward_params_f32(
            rt,
            column_reduction(s.cols),
            s.rows,
            s.cols,
            x.input(),
            mean.input(),
            rstd.input(),
            dy.input(),
            dgamma.output(),
            dbeta.output(),
        )
    }
}

pub fn check_layernorm(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let s = LayerNormShape {
        rows,
        cols,
        eps: 1e-12,
    };
    let case = format!("rows={rows} cols={cols}");
    let n = rows * cols;
    let mut rng = Inputs::new(6);
    let x: Vec<f32> = rng.uniform(n, -3.0, 3.0).iter().map(|v| v + 0.5).collect();
    let (gamma, beta) = (rng.uniform(cols, 0.5, 1.5), rng.uniform(cols, -0.5, 0.5));
    let dy = rng.uniform(n, -1.0, 1.0);
    let (dgamma0, dbeta0) = (rng.uniform(cols, -1.0, 1.0), rng.uniform(cols, -1.0, 1.0));

    let (dx_in, dgamma_in, dbeta_in) = (rt.upload(&x)?, rt.upload(&gamma)?, rt.upload(&beta)?);
    let (mut y, mut mean, mut rstd) = (rt.zeros(n)?, rt.zeros(rows)?, rt.zeros(rows)?);
    layernorm_forward(
        rt, &s, &dx_in, None, &dgamma_in, &dbeta_in, &mut y, &mut mean, &mut rstd,
    )?;
    let (mut want_y, mut want_mean, mut want_rstd) =
        (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    let s64 = LayerNormShape {
        rows,
        cols,
        eps: 1e-12f32 as f64,
    };
    layernorm_forward_reference(
        &s64,
        &wide(&x),
        &wide(&gamma),
        &wide(&beta),
        &mut want_y,
        &mut want_mean,
        &mut want_rstd,
    );
    let forward = worst(&[
        max_rel_error(&y.to_host()?, &want_y),
        max_rel_error(&mean.to_host()?, &want_mean),
        max_rel_error(&rstd.to_host()?, &want_rstd),
    ]);

    // With a residual: the sum is rounded to f32 as the kernel rounds it, then normalised in f64.
    let residual = rng.uniform(n, -1.0, 1.0);
    let part: Vec<f32> = x.iter().zip(&residual).map(|(x, r)| x - r).collect();
    let sum_reference: Vec<f64> = part
        .iter()
        .zip(&residual)
        .map(|(p, r)| (p + r) as f64)
        .collect();
    let mut sum = rt.upload(&vec![f32::NAN; n])?;
    let (mut y_add, mut mean_add, mut rstd_add) = (rt.zeros(n)?, rt.zeros(rows)?, rt.zeros(rows)?);
    layernorm_forward(
        rt,
        &s,
        &rt.upload(&part)?,
        Some((&rt.upload(&residual)?, &mut sum)),
        &dgamma_in,
        &dbeta_in,
        &mut y_add,
        &mut mean_add,
        &mut rstd_add,
    )?;
    let (mut want_y_add, mut want_mean_add, mut want_rstd_add) =
        (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    layernorm_forward_reference(
        &s64,
        &sum_reference,
        &wide(&gamma),
        &wide(&beta),
        &mut want_y_add,
        &mut want_mean_add,
        &mut want_rstd_add,
    );
    let add_forward = worst(&[
        max_rel_error(&sum.to_host()?, &sum_reference),
        max_rel_error(&y_add.to_host()?, &want_y_add),
        max_rel_error(&mean_add.to_host()?, &want_mean_add),
        max_rel_error(&rstd_add.to_host()?, &want_rstd_add),
    ]);

    // The backward takes the reference's saved statistics, so it is checked on its own.
    let (dmean, drstd) = (
        rt.upload(&narrow(&want_mean))?,
        rt.upload(&narrow(&want_rstd))?,
    );
    let (mut dx, mut dgamma, mut dbeta) = (
        rt.upload(&vec![f32::NAN; n])?,
        rt.upload(&dgamma0)?,
        rt.upload(&dbeta0)?,
    );
    layernorm_backward(
        rt,
        &s,
        &dx_in,
        &dgamma_in,
        &dmean,
        &drstd,
        &rt.upload(&dy)?,
        &mut dx,
        &mut dgamma,
        &mut dbeta,
    )?;
    let (mut want_dx, mut want_dgamma, mut want_dbeta) =
        (vec![0.0; n], wide(&dgamma0), wide(&dbeta0));
    layernorm_backward_reference(
        &s64,
        &wide(&x),
        &wide(&gamma),
        &wide(&narrow(&want_mean)),
        &wide(&narrow(&want_rstd)),
        &wide(&dy),
        &mut want_dx,
        &mut want_dgamma,
        &mut want_dbeta,
    );
    let params = worst(&[
        max_rel_error(&dgamma.to_host()?, &want_dgamma),
        max_rel_error(&dbeta.to_host()?, &want_dbeta),
    ]);
    Ok(vec![
        check(
            "layernorm_forward_f32",
            case.clone(),
            forward,
            F32_TOLERANCE,
        ),
        check(
            "add_layernorm_forward_f32",
            case.clone(),
            add_forward,
            F32_TOLERANCE,
        ),
        check(
            "layernorm_backward_dx_f32",
            case.clone(),
            max_rel_error(&dx.to_host()?, &want_dx),
            F32_TOLERANCE,
        ),
        check("layernorm_backward_params_f32", case, params, F32_TOLERANCE),
    ])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_layernorm(rt, 19, 77)
}
