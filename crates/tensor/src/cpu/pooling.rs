//! Sentence-embedding pooling: masked mean over tokens, then L2 normalisation
//! (sentence-transformers' `Pooling(mean)` + `Normalize`, with the same epsilons).

use crate::Float;

/// sentence-transformers clamps the token count with this before dividing.
const MIN_TOKEN_COUNT: f64 = 1e-9;
/// `torch.nn.functional.normalize`'s default epsilon.
const MIN_NORM: f64 = 1e-12;

fn token_count<F: Float>(mask: &[F]) -> F {
    let mut n = F::ZERO;
    for &m in mask {
        n += m;
    }
    n.max(F::from_f64(MIN_TOKEN_COUNT))
}

/// `x` is `[batch, seq, dim]`, `mask` `[batch, seq]`, `out` `[batch, dim]`.
pub fn mean_pool_forward<F: Float>(seq: usize, dim: usize, x: &[F], mask: &[F], out: &mut [F]) {
    for ((xb, mb), ob) in x.chunks_exact(seq * dim).zip(mask.chunks_exact(seq)).zip(out.chunks_exact_mut(dim)) {
        ob.iter_mut().for_each(|o| *o = F::ZERO);
        for (xt, &m) in xb.chunks_exact(dim).zip(mb) {
            if m != F::ZERO {
                for (o, &v) in ob.iter_mut().zip(xt) {
                    *o += m * v;
                }
            }
        }
        let n = token_count(mb);
        ob.iter_mut().for_each(|o| *o = *o / n);
    }
}

/// Overwrites `dx`: each unmasked token receives `mask·dout / count`.
pub fn mean_pool_backward<F: Float>(seq: usize, dim: usize, mask: &[F], dout: &[F], dx: &mut [F]) {
    for ((dxb, mb), db) in dx.chunks_exact_mut(seq * dim).zip(mask.chunks_exact(seq)).zip(dout.chunks_exact(dim)) {
        let n = token_count(mb);
        for (dxt, &m) in dxb.chunks_exact_mut(dim).zip(mb) {
            let w = m / n;
            for (d, &g) in dxt.iter_mut().zip(db) {
                *d = w * g;
            }
        }
    }
}

/// `y = x / max(‖x‖, ε)` per `dim`-wide row; `norms` saves `‖x‖` for the backward.
pub fn l2_normalize_forward<F: Float>(dim: usize, x: &[F], y: &mut [F], norms: &mut [F]) {
    for ((xr, yr), n) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)).zip(norms.iter_mut()) {
        let mut ss = F::ZERO;
        for &v in xr {
            ss += v * v;
        }
        *n = ss.sqrt();
        let denom = n.max(F::from_f64(MIN_NORM));
        for (y, &x) in yr.iter_mut().zip(xr) {
            *y = x / denom;
        }
    }
}

/// `dx = (dy − y·(y·dy)) / ‖x‖`, or `dy/ε` where the norm was clamped.
pub fn l2_normalize_backward<F: Float>(dim: usize, y: &[F], norms: &[F], dy: &[F], dx: &mut [F]) {
    let eps = F::from_f64(MIN_NORM);
    for (((yr, &n), dyr), dxr) in y.chunks_exact(dim).zip(norms).zip(dy.chunks_exact(dim)).zip(dx.chunks_exact_mut(dim)) {
        if n < eps {
            for (d, &g) in dxr.iter_mut().zip(dyr) {
                *d = g / eps;
            }
            continue;
        }
        let mut dot = F::ZERO;
        for (&y, &g) in yr.iter().zip(dyr) {
            dot += y * g;
        }
        for ((d, &y), &g) in dxr.iter_mut().zip(yr).zip(dyr) {
            *d = (g - y * dot) / n;
        }
    }
}
