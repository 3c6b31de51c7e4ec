//! Layer normalisation over the last dimension: `y = (x − μ)·rstd·γ + β`, `rstd = 1/√(σ² + ε)`.
//! The forward saves `μ` and `rstd` per row; the backward uses them instead of recomputing.
//! Inference also has the residual form `x ← LayerNorm(x + r)` in place, one pass over memory
//! instead of an add and a normalisation each reading and writing every element.

use crate::cpu::simd::{dispatch, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut, task_len};
use crate::{threads, Float};

pub struct LayerNormShape {
    pub rows: usize,
    pub cols: usize,
    pub eps: f64,
}

pub fn layernorm_forward_reference<F: Float>(
    s: &LayerNormShape,
    x: &[F],
    gamma: &[F],
    beta: &[F],
    y: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
) {
    let n = F::from_usize(s.cols);
    for r in 0..s.rows {
        let row = &x[r * s.cols..(r + 1) * s.cols];
        let mut mu = F::ZERO;
        for &v in row {
            mu += v;
        }
        mu = mu / n;
        let mut var = F::ZERO;
        for &v in row {
            var += (v - mu) * (v - mu);
        }
        let rs = F::ONE / (var / n + F::from_f64(s.eps)).sqrt();
        for (c, &v) in row.iter().enumerate() {
            y[r * s.cols + c] = (v - mu) * rs * gamma[c] + beta[c];
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/// `x ← LayerNorm(x + residual)`, no statistics kept (inference): the add, then the forward.
pub fn add_layernorm_forward_reference<F: Float>(
    s: &LayerNormShape,
    x: &mut [F],
    residual: &[F],
    gamma: &[F],
    beta: &[F],
) {
    let sum: Vec<F> = x.iter().zip(residual).map(|(&a, &b)| a + b).collect();
    let (mut mean, mut rstd) = (vec![F::ZERO; s.rows], vec![F::ZERO; s.rows]);
    layernorm_forward_reference(s, &sum, gamma, beta, x, &mut mean, &mut rstd);
}

/// Accumulates into `dgamma` and `dbeta` (they are parameter gradients); overwrites `dx`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_reference<F: Float>(
    s: &LayerNormShape,
    x: &[F],
    gamma: &[F],
    mean: &[F],
    rstd: &[F],
    dy: &[F],
    dx: &mut [F],
    dgamma: &mut [F],
    dbeta: &mut [F],
) {
    let n = F::from_usize(s.cols);
    for r in 0..s.rows {
        let o = r * s.cols;
        let (mu, rs) = (mean[r], rstd[r]);
        // dxhat = dy·γ; dx = rstd·(dxhat − mean(dxhat) − xhat·mean(dxhat·xhat))
        let mut sum_dxhat = F::ZERO;
        let mut sum_dxhat_xhat = F::ZERO;
        for c in 0..s.cols {
            let xhat = (x[o + c] - mu) * rs;
            let dxhat = dy[o + c] * gamma[c];
            sum_dxhat += dxhat;
            sum_dxhat_xhat += dxhat * xhat;
            dgamma[c] += dy[o + c] * xhat;
            dbeta[c] += dy[o + c];
        }
        let (m1, m2) = (sum_dxhat / n, sum_dxhat_xhat / n);
        for c in 0..s.cols {
            let xhat = (x[o + c] - mu) * rs;
            dx[o + c] = rs * (dy[o + c] * gamma[c] - m1 - xhat * m2);
        }
    }
}

pub fn layernorm_forward<F: Float>(
    s: &LayerNormShape,
    x: &[F],
    gamma: &[F],
    beta: &[F],
    y: &mut [F],
    mean: &mut [F],
    rstd: &mut [F],
) {
    match (as_f32(x), as_f32(gamma), as_f32(beta)) {
        (Some(x), Some(gamma), Some(beta)) => {
            let (y, mean, rstd) = (
                as_f32_mut(y).unwrap(),
                as_f32_mut(mean).unwrap(),
                as_f32_mut(rstd).unwrap(),
            );
            layernorm_forward_with_isa(Isa::best(), s, x, gamma, beta, y, mean, rstd)
        }
        _ => layernorm_forward_reference(s, x, gamma, beta, y, mean, rstd),
    }
}

/// `x ← LayerNorm(x + residual)` in place.
pub fn add_layernorm_forward<F: Float>(
    s: &LayerNormShape,
    x: &mut [F],
    residual: &[F],
    gamma: &[F],
    beta: &[F],
) {
    match (as_f32(residual), as_f32(gamma), as_f32(beta)) {
        (Some(residual), Some(gamma), Some(beta)) => {
            let x = as_f32_mut(x).unwrap();
            add_layernorm_forward_with_isa(Isa::best(), s, x, residual, gamma, beta)
        }
        _ => add_layernorm_forward_reference(s, x, residual, gamma, beta),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<F: Float>(
    s: &LayerNormShape,
    x: &[F],
    gamma: &[F],
    mean: &[F],
    rstd: &[F],
    dy: &[F],
    dx: &mut [F],
    dgamma: &mut [F],
    dbeta: &mut [F],
) {
    match (
        as_f32(x),
        as_f32(gamma),
        as_f32(mean),
        as_f32(rstd),
        as_f32(dy),
    ) {
        (Some(x), Some(gamma), Some(mean), Some(rstd), Some(dy)) => {
            let (dx, dgamma, dbeta) = (
                as_f32_mut(dx).unwrap(),
                as_f32_mut(dgamma).unwrap(),
                as_f32_mut(dbeta).unwrap(),
            );
            layernorm_backward_with_isa(Isa::best(), s, x, gamma, mean, rstd, dy, dx, dgamma, dbeta)
        }
        _ => layernorm_backward_reference(s, x, gamma, mean, rstd, dy, dx, dgamma, dbeta),
    }
}

/// Elements per task below which rows are not split over threads.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

fn rows_per_task(s: &LayerNormShape) -> usize {
    task_len(s.rows, MIN_ELEMS_PER_TASK.div_ceil(s.cols.max(1)))
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_with_isa(
    isa: Isa,
    s: &LayerNormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let (rows, cols) = (s.rows, s.cols);
    assert!(
        x.len() == rows * cols && y.len() == rows * cols,
        "layernorm: x or y has wrong length"
    );
    assert!(
        gamma.len() == cols && beta.len() == cols,
        "layernorm: gamma or beta has wrong length"
    );
    assert!(
        mean.len() == rows && rstd.len() == rows,
        "layernorm: mean or rstd has wrong length"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    let eps = s.eps as f32;
    let per = rows_per_task(s);
    let items: Vec<_> = x
        .chunks(per * cols)
        .zip(y.chunks_mut(per * cols))
        .zip(mean.chunks_mut(per))
        .zip(rstd.chunks_mut(per))
        .collect();
    threads::parallel_each(items, |(((x, y), mean), rstd)| {
        dispatch!(isa, |simd,
                        cols: usize,
                        eps: f32,
                        x: &[f32],
                        gamma: &[f32],
                        beta: &[f32],
                        y: &mut [f32],
                        mean: &mut [f32],
                        rstd: &mut [f32]|
         -> () {
            forward_rows(simd, cols, eps, x, gamma, beta, y, mean, rstd)
        })
    });
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_rows<S: Simd>(
    simd: S,
    cols: usize,
    eps: f32,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    for (((x, y), mean), rstd) in x
        .chunks_exact(cols)
        .zip(y.chunks_exact_mut(cols))
        .zip(mean)
        .zip(rstd)
    {
        let mut sum = simd.zero();
        for c in (0..cols).step_by(S::LANES) {
            sum = simd.add(sum, simd.load_or(&x[c..], 0.0));
        }
        let mu = simd.reduce_sum(sum) / cols as f32;
        let rs = row_rstd(simd, x, mu, eps);
        for c in (0..cols).step_by(S::LANES) {
            let out = affine(simd, simd.load_or(&x[c..], 0.0), mu, rs, gamma, beta, c);
            simd.store_or(&mut y[c..], out);
        }
        *mean = mu;
        *rstd = rs;
    }
}

/// [`forward_rows`] of `x + residual`, written over `x`, without statistics.
#[inline(always)]
fn add_forward_rows<S: Simd>(
    simd: S,
    cols: usize,
    eps: f32,
    x: &mut [f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
) {
    for (x, residual) in x.chunks_exact_mut(cols).zip(residual.chunks_exact(cols)) {
        let mut sum = simd.zero();
        for c in (0..cols).step_by(S::LANES) {
            let v = simd.add(
                simd.load_or(&x[c..], 0.0),
                simd.load_or(&residual[c..], 0.0),
            );
            simd.store_or(&mut x[c..], v);
            sum = simd.add(sum, v);
        }
        let mu = simd.reduce_sum(sum) / cols as f32;
        let rs = row_rstd(simd, x, mu, eps);
        for c in (0..cols).step_by(S::LANES) {
            let out = affine(simd, simd.load_or(&x[c..], 0.0), mu, rs, gamma, beta, c);
            simd.store_or(&mut x[c..], out);
        }
    }
}

/// `1/√(σ² + ε)` of one row with mean `mu`: centred, then squared, as the reference does (no
/// cancellation).
#[inline(always)]
fn row_rstd<S: Simd>(simd: S, row: &[f32], mu: f32, eps: f32) -> f32 {
    let mu_v = simd.splat(mu);
    let mut sq = simd.zero();
    for c in (0..row.len()).step_by(S::LANES) {
        let d = simd.sub(simd.load_or(&row[c..], mu), mu_v);
        sq = simd.mul_add(d, d, sq);
    }
    1.0 / (simd.reduce_sum(sq) / row.len() as f32 + eps).sqrt()
}

/// `(v − μ)·rstd·γ + β` for the lanes of columns `c..`.
#[inline(always)]
fn affine<S: Simd>(
    simd: S,
    v: S::V,
    mu: f32,
    rs: f32,
    gamma: &[f32],
    beta: &[f32],
    c: usize,
) -> S::V {
    let xhat = simd.mul(simd.sub(v, simd.splat(mu)), simd.splat(rs));
    simd.mul_add(
        xhat,
        simd.load_or(&gamma[c..], 0.0),
        simd.load_or(&beta[c..], 0.0),
    )
}

/// Rows are split over tasks; each task sums its rows' `dgamma`/`dbeta` contributions into its
/// own scratch, and the scratches are added into the outputs at the end.
/// `x ← LayerNorm(x + residual)` in place, rows spread over threads.
pub fn add_layernorm_forward_with_isa(
    isa: Isa,
    s: &LayerNormShape,
    x: &mut [f32],
    residual: &[f32],
    gamma: &[f32],
    beta: &[f32],
) {
    let (rows, cols) = (s.rows, s.cols);
    assert!(
        x.len() == rows * cols && residual.len() == rows * cols,
        "add_layernorm: x or residual has wrong length"
    );
    assert!(
        gamma.len() == cols && beta.len() == cols,
        "add_layernorm: gamma or beta has wrong length"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    let eps = s.eps as f32;
    let per = rows_per_task(s) * cols;
    let items: Vec<_> = x.chunks_mut(per).zip(residual.chunks(per)).collect();
    threads::parallel_each(items, |(x, residual)| {
        dispatch!(isa, |simd,
                        cols: usize,
                        eps: f32,
                        x: &mut [f32],
                        residual: &[f32],
                        gamma: &[f32],
                        beta: &[f32]|
         -> () {
            add_forward_rows(simd, cols, eps, x, residual, gamma, beta)
        })
    });
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_with_isa(
    isa: Isa,
    s: &LayerNormShape,
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let (rows, cols) = (s.rows, s.cols);
    assert!(
        x.len() == rows * cols && dy.len() == rows * cols && dx.len() == rows * cols,
        "layernorm_backward: x, dy or dx has wrong length"
    );
    assert!(
        gamma.len() == cols && dgamma.len() == cols && dbeta.len() == cols,
        "layernorm_backward: gamma, dgamma or dbeta has wrong length"
    );
    assert!(
        mean.len() == rows && rstd.len() == rows,
        "layernorm_backward: mean or rstd has wrong length"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    let per = rows_per_task(s);
    let mut partials = vec![0.0f32; rows.div_ceil(per) * 2 * cols];
    let items: Vec<_> = x
        .chunks(per * cols)
        .zip(dy.chunks(per * cols))
        .zip(dx.chunks_mut(per * cols))
        .zip(mean.chunks(per).zip(rstd.chunks(per)))
        .zip(partials.chunks_mut(2 * cols))
        .collect();
    threads::parallel_each(items, |((((x, dy), dx), (mean, rstd)), partial)| {
        let (pgamma, pbeta) = partial.split_at_mut(cols);
        dispatch!(isa, |simd,
                        cols: usize,
                        x: &[f32],
                        gamma: &[f32],
                        mean: &[f32],
                        rstd: &[f32],
                        dy: &[f32],
                        dx: &mut [f32],
                        pgamma: &mut [f32],
                        pbeta: &mut [f32]|
         -> () {
            backward_rows(simd, cols, x, gamma, mean, rstd, dy, dx, pgamma, pbeta)
        })
    });
    for partial in partials.chunks_exact(2 * cols) {
        for ((g, b), (pg, pb)) in dgamma
            .iter_mut()
            .zip(dbeta.iter_mut())
            .zip(partial[..cols].iter().zip(&partial[cols..]))
        {
            *g += pg;
            *b += pb;
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_rows<S: Simd>(
    simd: S,
    cols: usize,
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let inv_n = 1.0 / cols as f32;
    let rows = x
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols));
    for (((x, dy), dx), (&mu, &rs)) in rows.zip(mean.iter().zip(rstd)) {
        let (mu_v, rs_v) = (simd.splat(mu), simd.splat(rs));
        let (mut sum_dxhat, mut sum_dxhat_xhat) = (simd.zero(), simd.zero());
        for c in (0..cols).step_by(S::LANES) {
            // Tail lanes load dy = 0, so they add nothing to the sums.
            let g = simd.load_or(&dy[c..], 0.0);
            let xhat = simd.mul(simd.sub(simd.load_or(&x[c..], 0.0), mu_v), rs_v);
            let dxhat = simd.mul(g, simd.load_or(&gamma[c..], 0.0));
            sum_dxhat = simd.add(sum_dxhat, dxhat);
            sum_dxhat_xhat = simd.mul_add(dxhat, xhat, sum_dxhat_xhat);
            let dg = simd.mul_add(g, xhat, simd.load_or(&dgamma[c..], 0.0));
            simd.store_or(&mut dgamma[c..], dg);
            let db = simd.add(g, simd.load_or(&dbeta[c..], 0.0));
            simd.store_or(&mut dbeta[c..], db);
        }
        let m1 = simd.splat(simd.reduce_sum(sum_dxhat) * inv_n);
        let m2 = simd.splat(simd.reduce_sum(sum_dxhat_xhat) * inv_n);
        for c in (0..cols).step_by(S::LANES) {
            let xhat = simd.mul(simd.sub(simd.load_or(&x[c..], 0.0), mu_v), rs_v);
            let dxhat = simd.mul(simd.load_or(&dy[c..], 0.0), simd.load_or(&gamma[c..], 0.0));
            // rstd·(dxhat − m1 − xhat·m2)
            let inner = simd.sub(simd.sub(dxhat, m1), simd.mul(xhat, m2));
            simd.store_or(&mut dx[c..], simd.mul(rs_v, inner));
        }
    }
}
