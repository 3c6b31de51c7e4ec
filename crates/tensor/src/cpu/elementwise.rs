//! Elementwise kernels: the glue between the heavy ops.

use crate::Float;

/// `out = a + b`.
pub fn add<F: Float>(a: &[F], b: &[F], out: &mut [F]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a + b;
    }
}

/// `y += alpha·x`.
pub fn axpy<F: Float>(alpha: F, x: &[F], y: &mut [F]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `x *= alpha`.
pub fn scale<F: Float>(alpha: F, x: &mut [F]) {
    for v in x.iter_mut() {
        *v *= alpha;
    }
}

/// Adds the `cols`-wide `bias` to every row of `x`.
pub fn add_bias<F: Float>(cols: usize, bias: &[F], x: &mut [F]) {
    for row in x.chunks_exact_mut(cols) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `dbias += Σ_rows dy`.
pub fn bias_backward<F: Float>(cols: usize, dy: &[F], dbias: &mut [F]) {
    for row in dy.chunks_exact(cols) {
        for (d, &g) in dbias.iter_mut().zip(row) {
            *d += g;
        }
    }
}
