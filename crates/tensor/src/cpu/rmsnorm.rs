//! RMS normalisation over the last dimension (Llama's `LlamaRMSNorm`):
//! `y = x·rstd·w`, `rstd = 1/√(mean(x²) + ε)`. The forward saves `rstd` per row for the backward.

use crate::cpu::simd::{dispatch, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut, task_len};
use crate::{threads, Float};

#[derive(Clone, Copy, Debug)]
pub struct RmsNormShape {
    pub rows: usize,
    pub cols: usize,
    pub eps: f64,
}

impl RmsNormShape {
    fn check<F>(&self, x: &[F], w: &[F], y: &[F], rstd: &[F]) {
        assert!(
            x.len() == self.rows * self.cols && y.len() == x.len(),
            "rmsnorm: x or y has wrong length"
        );
        assert_eq!(w.len(), self.cols, "rmsnorm: weight has wrong length");
        assert_eq!(rstd.len(), self.rows, "rmsnorm: rstd has wrong length");
    }
}

fn row_rstd_reference<F: Float>(row: &[F], eps: f64) -> F {
    let mut sum = F::ZERO;
    for &v in row {
        sum += v * v;
    }
    F::ONE / (sum / F::from_usize(row.len()) + F::from_f64(eps)).sqrt()
}

pub fn rmsnorm_forward_reference<F: Float>(
    s: &RmsNormShape,
    x: &[F],
    w: &[F],
    y: &mut [F],
    rstd: &mut [F],
) {
    s.check(x, w, y, rstd);
    for ((row, out), rs) in x
        .chunks_exact(s.cols.max(1))
        .zip(y.chunks_exact_mut(s.cols.max(1)))
        .zip(rstd.iter_mut())
    {
        *rs = row_rstd_reference(row, s.eps);
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
            *o = v * *rs * g;
        }
    }
}

/// Overwrites `dx`; accumulates into `dw` (a parameter gradient). With `x̂ = x·rstd`:
/// `dw += Σ_rows dy∘x̂`, `dx = rstd·(dy∘w − x̂·mean(dy∘w∘x̂))`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_reference<F: Float>(
    s: &RmsNormShape,
    x: &[F],
    w: &[F],
    rstd: &[F],
    dy: &[F],
    dx: &mut [F],
    dw: &mut [F],
) {
    s.check(x, w, dx, rstd);
    assert_eq!(dy.len(), x.len(), "rmsnorm: dy has wrong length");
    assert_eq!(dw.len(), s.cols, "rmsnorm: dw has wrong length");
    let n = F::from_usize(s.cols);
    for (r, &rs) in rstd.iter().enumerate() {
        let o = r * s.cols;
        let mut sum = F::ZERO;
        for c in 0..s.cols {
            let xhat = x[o + c] * rs;
            sum += dy[o + c] * w[c] * xhat;
            dw[c] += dy[o + c] * xhat;
        }
        let mean = sum / n;
        for c in 0..s.cols {
            let xhat = x[o + c] * rs;
            dx[o + c] = rs * (dy[o + c] * w[c] - xhat * mean);
        }
    }
}

pub fn rmsnorm_forward<F: Float>(s: &RmsNormShape, x: &[F], w: &[F], y: &mut [F], rstd: &mut [F]) {
    match (as_f32(x), as_f32(w)) {
        (Some(x), Some(w)) => {
            let (y, rstd) = (as_f32_mut(y).unwrap(), as_f32_mut(rstd).unwrap());
            rmsnorm_forward_with_isa(Isa::best(), s, x, w, y, rstd)
        }
        _ => rmsnorm_forward_reference(s, x, w, y, rstd),
    }
}

/// Elements per task below which rows are not split over threads (as for LayerNorm).
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// Rows split over threads, each row one SIMD pass for `Σx²` and one for the output.
pub fn rmsnorm_forward_with_isa(
    isa: Isa,
    s: &RmsNormShape,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rstd: &mut [f32],
) {
    s.check(x, w, y, rstd);
    let cols = s.cols;
    if s.rows == 0 || cols == 0 {
        return;
    }
    let eps = s.eps as f32;
    let per = task_len(s.rows, MIN_ELEMS_PER_TASK.div_ceil(cols));
    let items: Vec<_> = x
        .chunks(per * cols)
        .zip(y.chunks_mut(per * cols))
        .zip(rstd.chunks_mut(per))
        .collect();
    threads::parallel_each(items, |((x, y), rstd)| {
        dispatch!(isa, |simd,
                        cols: usize,
                        eps: f32,
                        x: &[f32],
                        w: &[f32],
                        y: &mut [f32],
                        rstd: &mut [f32]|
         -> () {
            forward_rows(simd, cols, eps, x, w, y, rstd)
        })
    });
}

#[inline(always)]
fn forward_rows<S: Simd>(
    simd: S,
    cols: usize,
    eps: f32,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rstd: &mut [f32],
) {
    for ((x, y), rstd) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)).zip(rstd) {
        let mut sum = simd.zero();
        for c in (0..cols).step_by(S::LANES) {
            let v = simd.load_or(&x[c..], 0.0);
            sum = simd.mul_add(v, v, sum);
        }
        let rs = 1.0 / (simd.reduce_sum(sum) / cols as f32 + eps).sqrt();
        let rs_v = simd.splat(rs);
        for c in (0..cols).step_by(S::LANES) {
            let v = simd.mul(
                simd.mul(simd.load_or(&x[c..], 0.0), rs_v),
                simd.load_or(&w[c..], 0.0),
            );
            simd.store_or(&mut y[c..], v);
        }
        *rstd = rs;
    }
}
