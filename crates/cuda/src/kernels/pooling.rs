//! `kernels/pooling.cu`: masked mean pooling and L2 normalisation, forward and backward; and
//! their checks.

use scalpel_tensor::cpu::pooling;

use super::{expect_len, grid_stride, rows_of, warp_per_row};
use crate::check::{check, max_rel_error, narrow, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{DeviceBuffer, Result, Runtime};

launchers!("pooling");

/// `x` is `[batch, seq, dim]`, `mask` `[batch, seq]`, `out` `[batch, dim]`.
pub fn mean_pool_forward(
    rt: &Runtime,
    seq: usize,
    dim: usize,
    x: &DeviceBuffer<f32>,
    mask: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let batch = rows_of("mask", mask.len(), seq)?;
    expect_len(rt, "x", x, batch * seq * dim)?;
    expect_len(rt, "out", out, batch * dim)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::mean_pool_forward_f32(
            rt,
            grid_stride(batch * dim),
            batch,
            seq,
            dim,
            x.input(),
            mask.input(),
            out.output(),
        )
    }
}

/// Overwrites `dx`: each unmasked token receives `mask·dout / count`.
pub fn mean_pool_backward(
    rt: &Runtime,
    seq: usize,
    dim: usize,
    mask: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let batch = rows_of("mask", mask.len(), seq)?;
    expect_len(rt, "dout", dout, batch * dim)?;
    expect_len(rt, "dx", dx, batch * seq * dim)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::mean_pool_backward_f32(
            rt,
            warp_per_row(batch * seq),
            batch,
            seq,
            dim,
            mask.input(),
            dout.input(),
            dx.output(),
        )
    }
}

/// `y = x / max(‖x‖, ε)` per `dim`-wide row; `norms` saves `‖x‖` for the backward.
pub fn l2_normalize_forward(
    rt: &Runtime,
    dim: usize,
    x: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<f32>,
    norms: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("x", x.len(), dim)?;
    expect_len(rt, "y", y, x.len())?;
    expect_len(rt, "norms", norms, rows)?;
    // SAFETY: lengths checked.
    unsafe {
        launch::l2_normalize_forward_f32(
            rt,
            warp_per_row(rows),
            rows,
            dim,
            x.input(),
            y.output(),
            norms.output(),
        )
    }
}

/// `dx = (dy − y·(y·dy)) / ‖x‖`, or `dy/ε` where the norm was clamped; overwrites `dx`.
pub fn l2_normalize_backward(
    rt: &Runtime,
    dim: usize,
    y: &DeviceBuffer<f32>,
    norms: &DeviceBuffer<f32>,
    dy: &DeviceBuffer<f32>,
    dx: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = rows_of("y", y.len(), dim)?;
    expect_len(rt, "norms", norms, rows)?;
    expect_len(rt, "dy", dy, y.len())?;
    expect_len(rt, "dx", dx, y.len())?;
    // SAFETY: lengths checked.
    unsafe {
        launch::l2_normalize_backward_f32(
            rt,
            warp_per_row(rows),
            rows,
            dim,
            y.input(),
            norms.input(),
            dy.input(),
            dx.output(),
        )
    }
}

pub fn check_pooling(
    rt: &Runtime,
    batch: usize,
    seq: usize,
    dim: usize,
) -> Result<Vec<KernelCheck>> {
    let case = format!("batch={batch} seq={seq} dim={dim}");
    let mut rng = Inputs::new(10);
    let x = rng.uniform(batch * seq * dim, -2.0, 2.0);
    // Each sentence has its own length; the last is all padding (the count clamps to 1e-9).
    let mask: Vec<f32> = (0..batch * seq)
        .map(|i| {
            let (b, t) = (i / seq, i % seq);
            if b + 1 < batch && t < seq - b % seq {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let dout = rng.uniform(batch * dim, -1.0, 1.0);
    let (dx_in, dmask) = (rt.upload(&x)?, rt.upload(&mask)?);

    let mut pooled = rt.zeros(batch * dim)?;
    mean_pool_forward(rt, seq, dim, &dx_in, &dmask, &mut pooled)?;
    let mut want = vec![0.0; batch * dim];
    pooling::mean_pool_forward(seq, dim, &wide(&x), &wide(&mask), &mut want);
    let pool_forward = check(
        "mean_pool_forward_f32",
        case.clone(),
        max_rel_error(&pooled.to_host()?, &want),
        F32_TOLERANCE,
    );

    let mut dx = rt.upload(&vec![f32::NAN; batch * seq * dim])?;
    mean_pool_backward(rt, seq, dim, &dmask, &rt.upload(&dout)?, &mut dx)?;
    let mut want = vec![0.0; batch * seq * dim];
    pooling::mean_pool_backward(seq, dim, &wide(&mask), &wide(&dout), &mut want);
    let pool_backward = check(
        "mean_pool_backward_f32",
        case.clone(),
        max_rel_error(&dx.to_host()?, &want),
        F32_TOLERANCE,
    );

    // Normalise rows including an all-zero one (the clamped branch).
    let mut rows = rng.uniform(batch * dim, -1.0, 1.0);
    rows[..dim].iter_mut().for_each(|v| *v = 0.0);
    let (mut y, mut norms) = (rt.zeros(batch * dim)?, rt.zeros(batch)?);
    l2_normalize_forward(rt, dim, &rt.upload(&rows)?, &mut y, &mut norms)?;
    let (mut want_y, mut want_norms) = (vec![0.0; batch * dim], vec![0.0; batch]);
    pooling::l2_normalize_forward(dim, &wide(&rows), &mut want_y, &mut want_norms);
    let norm_forward = worst(&[
        max_rel_error(&y.to_host()?, &want_y),
        max_rel_error(&norms.to_host()?, &want_norms),
    ]);

    let (y32, norms32) = (narrow(&want_y), narrow(&want_norms));
    let mut dx = rt.upload(&vec![f32::NAN; batch * dim])?;
    l2_normalize_backward(
        rt,
        dim,
        &rt.upload(&y32)?,
        &rt.upload(&norms32)?,
        &rt.upload(&dout)?,
        &mut dx,
    )?;
    let mut want = vec![0.0; batch * dim];
    pooling::l2_normalize_backward(dim, &wide(&y32), &wide(&norms32), &wide(&dout), &mut want);
    // The clamped row's gradient is dy / 1e-12: compare the ordinary rows on their own scale.
    let norm_backward = worst(&[
        max_rel_error(&dx.to_host()?[dim..], &want[dim..]),
        max_rel_error(&dx.to_host()?[..dim], &want[..dim]),
    ]);
    Ok(vec![
        pool_forward,
        pool_backward,
        check(
            "l2_normalize_forward_f32",
            case.clone(),
            norm_forward,
            F32_TOLERANCE,
        ),
        check(
            "l2_normalize_backward_f32",
            case,
            norm_backward,
            F32_TOLERANCE,
        ),
    ])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_pooling(rt, 5, 11, 45)
}
