//! Layer normalisation over the last dimension: `y = (x − μ)·rstd·γ + β`, `rstd = 1/√(σ² + ε)`.
//! The forward saves `μ` and `rstd` per row; the backward uses them instead of recomputing.

use crate::Float;

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
    layernorm_forward_reference(s, x, gamma, beta, y, mean, rstd)
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
    layernorm_backward_reference(s, x, gamma, mean, rstd, dy, dx, dgamma, dbeta)
}
