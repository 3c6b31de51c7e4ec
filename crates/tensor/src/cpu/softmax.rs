//! Row softmax and softmax cross-entropy, each with its backward.

use crate::Float;

/// Numerically stable softmax of each `cols`-wide row.
pub fn softmax_forward_reference<F: Float>(cols: usize, x: &[F], y: &mut [F]) {
    for (xr, yr) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
        let max = xr.iter().fold(F::neg_infinity(), |m, &v| m.max(v));
        let mut sum = F::ZERO;
        for (y, &x) in yr.iter_mut().zip(xr) {
            *y = (x - max).exp();
            sum += *y;
        }
        for y in yr.iter_mut() {
            *y = *y / sum;
        }
    }
}

/// `dx = y ∘ (dy − Σ dy∘y)` per row.
pub fn softmax_backward_reference<F: Float>(cols: usize, y: &[F], dy: &[F], dx: &mut [F]) {
    for ((yr, dyr), dxr) in y.chunks_exact(cols).zip(dy.chunks_exact(cols)).zip(dx.chunks_exact_mut(cols)) {
        let mut dot = F::ZERO;
        for (&y, &dy) in yr.iter().zip(dyr) {
            dot += y * dy;
        }
        for ((dx, &y), &dy) in dxr.iter_mut().zip(yr).zip(dyr) {
            *dx = y * (dy - dot);
        }
    }
}

pub fn softmax_forward<F: Float>(cols: usize, x: &[F], y: &mut [F]) {
    softmax_forward_reference(cols, x, y)
}

pub fn softmax_backward<F: Float>(cols: usize, y: &[F], dy: &[F], dx: &mut [F]) {
    softmax_backward_reference(cols, y, dy, dx)
}

/// Mean over rows of `−log softmax(logits)[target]`. Writes the softmax into `probs` (saved for
/// the backward) and returns the loss. Targets must be `< cols` (checked by `ops`).
pub fn cross_entropy_forward<F: Float>(cols: usize, logits: &[F], targets: &[usize], probs: &mut [F]) -> F {
    softmax_forward(cols, logits, probs);
    let mut loss = F::ZERO;
    for (row, &t) in probs.chunks_exact(cols).zip(targets) {
        loss -= row[t].ln();
    }
    loss / F::from_usize(targets.len())
}

/// `dlogits = dloss · (softmax − onehot(target)) / rows`.
pub fn cross_entropy_backward<F: Float>(cols: usize, probs: &[F], targets: &[usize], dloss: F, dlogits: &mut [F]) {
    let scale = dloss / F::from_usize(targets.len());
    for ((p, d), &t) in probs.chunks_exact(cols).zip(dlogits.chunks_exact_mut(cols)).zip(targets) {
        for (d, &p) in d.iter_mut().zip(p) {
            *d = p * scale;
        }
        d[t] -= scale;
    }
}
