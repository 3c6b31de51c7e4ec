//! Sentence-embedding pooling: masked mean over tokens, then L2 normalisation
//! (sentence-transformers' `Pooling(mean)` + `Normalize`, with the same epsilons).

use crate::cpu::simd::{axpy, dispatch, dot, lanes, scale_into, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut};
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
pub fn mean_pool_forward_reference<F: Float>(
    seq: usize,
    dim: usize,
    x: &[F],
    mask: &[F],
    out: &mut [F],
) {
    for ((xb, mb), ob) in x
        .chunks_exact(seq * dim)
        .zip(mask.chunks_exact(seq))
        .zip(out.chunks_exact_mut(dim))
    {
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
pub fn mean_pool_backward_reference<F: Float>(
    seq: usize,
    dim: usize,
    mask: &[F],
    dout: &[F],
    dx: &mut [F],
) {
    for ((dxb, mb), db) in dx
        .chunks_exact_mut(seq * dim)
        .zip(mask.chunks_exact(seq))
        .zip(dout.chunks_exact(dim))
    {
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
pub fn l2_normalize_forward_reference<F: Float>(dim: usize, x: &[F], y: &mut [F], norms: &mut [F]) {
    for ((xr, yr), n) in x
        .chunks_exact(dim)
        .zip(y.chunks_exact_mut(dim))
        .zip(norms.iter_mut())
    {
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
pub fn l2_normalize_backward_reference<F: Float>(
    dim: usize,
    y: &[F],
    norms: &[F],
    dy: &[F],
    dx: &mut [F],
) {
    let eps = F::from_f64(MIN_NORM);
    for (((yr, &n), dyr), dxr) in y
        .chunks_exact(dim)
        .zip(norms)
        .zip(dy.chunks_exact(dim))
        .zip(dx.chunks_exact_mut(dim))
    {
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

/// `x` is `[batch, seq, dim]`, `mask` `[batch, seq]`, `out` `[batch, dim]`.
pub fn mean_pool_forward<F: Float>(seq: usize, dim: usize, x: &[F], mask: &[F], out: &mut [F]) {
    match (as_f32(x), as_f32(mask), as_f32_mut(out)) {
        (Some(x), Some(mask), Some(out)) => {
            mean_pool_forward_with_isa(Isa::best(), seq, dim, x, mask, out)
        }
        _ => mean_pool_forward_reference(seq, dim, x, mask, out),
    }
}

/// Overwrites `dx`: each unmasked token receives `mask·dout / count`.
pub fn mean_pool_backward<F: Float>(seq: usize, dim: usize, mask: &[F], dout: &[F], dx: &mut [F]) {
    match (as_f32(mask), as_f32(dout), as_f32_mut(dx)) {
        (Some(mask), Some(dout), Some(dx)) => {
            mean_pool_backward_with_isa(Isa::best(), seq, dim, mask, dout, dx)
        }
        _ => mean_pool_backward_reference(seq, dim, mask, dout, dx),
    }
}

/// `y = x / max(‖x‖, ε)` per `dim`-wide row; `norms` saves `‖x‖` for the backward.
pub fn l2_normalize_forward<F: Float>(dim: usize, x: &[F], y: &mut [F], norms: &mut [F]) {
    match (as_f32(x), as_f32_mut(y), as_f32_mut(norms)) {
        (Some(x), Some(y), Some(norms)) => {
            l2_normalize_forward_with_isa(Isa::best(), dim, x, y, norms)
        }
        _ => l2_normalize_forward_reference(dim, x, y, norms),
    }
}

/// `dx = (dy − y·(y·dy)) / ‖x‖`, or `dy/ε` where the norm was clamped.
pub fn l2_normalize_backward<F: Float>(dim: usize, y: &[F], norms: &[F], dy: &[F], dx: &mut [F]) {
    match (as_f32(y), as_f32(norms), as_f32(dy), as_f32_mut(dx)) {
        (Some(y), Some(norms), Some(dy), Some(dx)) => {
            l2_normalize_backward_with_isa(Isa::best(), dim, y, norms, dy, dx)
        }
        _ => l2_normalize_backward_reference(dim, y, norms, dy, dx),
    }
}

// Pooling touches `batch·seq·dim` values once per call and the sentence batch is small, so these
// stay single-threaded; SIMD is all that pays.

pub fn mean_pool_forward_with_isa(
    isa: Isa,
    seq: usize,
    dim: usize,
    x: &[f32],
    mask: &[f32],
    out: &mut [f32],
) {
    assert!(
        x.len() == mask.len() * dim && out.len() * seq == mask.len() * dim,
        "mean_pool: lengths disagree"
    );
    if seq == 0 || dim == 0 {
        out.fill(0.0);
        return;
    }
    dispatch!(isa, |s,
                    seq: usize,
                    dim: usize,
                    x: &[f32],
                    mask: &[f32],
                    out: &mut [f32]|
     -> () {
        for ((xb, mb), ob) in x
            .chunks_exact(seq * dim)
            .zip(mask.chunks_exact(seq))
            .zip(out.chunks_exact_mut(dim))
        {
            ob.fill(0.0);
            for (xt, &m) in xb.chunks_exact(dim).zip(mb) {
                if m != 0.0 {
                    axpy(s, m, xt, ob);
                }
            }
            let inv = 1.0 / token_count(mb);
            for o in ob.iter_mut() {
                *o *= inv;
            }
        }
    })
}

pub fn mean_pool_backward_with_isa(
    isa: Isa,
    seq: usize,
    dim: usize,
    mask: &[f32],
    dout: &[f32],
    dx: &mut [f32],
) {
    assert!(
        dx.len() == mask.len() * dim && dout.len() * seq == mask.len() * dim,
        "mean_pool_backward: lengths disagree"
    );
    if seq == 0 || dim == 0 {
        return;
    }
    dispatch!(isa, |s,
                    seq: usize,
                    dim: usize,
                    mask: &[f32],
                    dout: &[f32],
                    dx: &mut [f32]|
     -> () {
        for ((dxb, mb), db) in dx
            .chunks_exact_mut(seq * dim)
            .zip(mask.chunks_exact(seq))
            .zip(dout.chunks_exact(dim))
        {
            let n = token_count(mb);
            for (dxt, &m) in dxb.chunks_exact_mut(dim).zip(mb) {
                scale_into(s, m / n, db, dxt);
            }
        }
    })
}

pub fn l2_normalize_forward_with_isa(
    isa: Isa,
    dim: usize,
    x: &[f32],
    y: &mut [f32],
    norms: &mut [f32],
) {
    assert!(
        x.len() == y.len() && x.len() == norms.len() * dim,
        "l2_normalize: lengths disagree"
    );
    if dim == 0 {
        norms.fill(0.0);
        return;
    }
    dispatch!(isa, |s,
                    dim: usize,
                    x: &[f32],
                    y: &mut [f32],
                    norms: &mut [f32]|
     -> () {
        for ((xr, yr), n) in x
            .chunks_exact(dim)
            .zip(y.chunks_exact_mut(dim))
            .zip(norms.iter_mut())
        {
            *n = dot(s, xr, xr).sqrt();
            scale_into(s, 1.0 / n.max(MIN_NORM as f32), xr, yr);
        }
    })
}

pub fn l2_normalize_backward_with_isa(
    isa: Isa,
    dim: usize,
    y: &[f32],
    norms: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) {
    assert!(
        y.len() == dy.len() && y.len() == dx.len() && y.len() == norms.len() * dim,
        "l2_normalize_backward: lengths disagree"
    );
    if dim == 0 {
        return;
    }
    dispatch!(isa, |s,
                    dim: usize,
                    y: &[f32],
                    norms: &[f32],
                    dy: &[f32],
                    dx: &mut [f32]|
     -> () {
        let eps = MIN_NORM as f32;
        let rows = y
            .chunks_exact(dim)
            .zip(norms)
            .zip(dy.chunks_exact(dim))
            .zip(dx.chunks_exact_mut(dim));
        for (((yr, &n), dyr), dxr) in rows {
            if n < eps {
                scale_into(s, 1.0 / eps, dyr, dxr);
                continue;
            }
            let (dot, inv) = (s.splat(dot(s, yr, dyr)), s.splat(1.0 / n));
            for c in (0..dim).step_by(lanes(s)) {
                let (yv, g) = (s.load_or(&yr[c..], 0.0), s.load_or(&dyr[c..], 0.0));
                s.store_or(&mut dxr[c..], s.mul(s.sub(g, s.mul(yv, dot)), inv));
            }
        }
    })
}
