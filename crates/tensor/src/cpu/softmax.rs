//! Row softmax and softmax cross-entropy, each with its backward.

use crate::cpu::simd::{dispatch, dot, exp, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut, task_len};
use crate::{threads, Float};

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
    for ((yr, dyr), dxr) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
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
    match (as_f32(x), as_f32_mut(y)) {
        (Some(x), Some(y)) => softmax_forward_with_isa(Isa::best(), cols, x, y),
        _ => softmax_forward_reference(cols, x, y),
    }
}

pub fn softmax_backward<F: Float>(cols: usize, y: &[F], dy: &[F], dx: &mut [F]) {
    match (as_f32(y), as_f32(dy), as_f32_mut(dx)) {
        (Some(y), Some(dy), Some(dx)) => softmax_backward_with_isa(Isa::best(), cols, y, dy, dx),
        _ => softmax_backward_reference(cols, y, dy, dx),
    }
}

/// Elements per task below which rows are not split over threads.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// Row-aligned chunk length (in elements) for splitting `len` elements of `cols`-wide rows.
fn chunk_elems(cols: usize, len: usize) -> usize {
    task_len(len / cols, MIN_ELEMS_PER_TASK.div_ceil(cols)) * cols
}

pub fn softmax_forward_with_isa(isa: Isa, cols: usize, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "softmax: x and y differ in length");
    if cols == 0 || x.is_empty() {
        return;
    }
    assert_eq!(
        x.len() % cols,
        0,
        "softmax: length is not a whole number of rows"
    );
    let chunk = chunk_elems(cols, x.len());
    let items: Vec<_> = x.chunks(chunk).zip(y.chunks_mut(chunk)).collect();
    threads::parallel_each(items, |(x, y)| {
        dispatch!(isa, |s, cols: usize, x: &[f32], y: &mut [f32]| -> () {
            forward_rows(s, cols, x, y)
        })
    });
}

pub fn softmax_backward_with_isa(isa: Isa, cols: usize, y: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(
        y.len() == dy.len() && y.len() == dx.len(),
        "softmax_backward: lengths differ"
    );
    if cols == 0 || y.is_empty() {
        return;
    }
    assert_eq!(
        y.len() % cols,
        0,
        "softmax_backward: length is not a whole number of rows"
    );
    let chunk = chunk_elems(cols, y.len());
    let items: Vec<_> = y
        .chunks(chunk)
        .zip(dy.chunks(chunk))
        .zip(dx.chunks_mut(chunk))
        .collect();
    threads::parallel_each(items, |((y, dy), dx)| {
        dispatch!(isa, |s,
                        cols: usize,
                        y: &[f32],
                        dy: &[f32],
                        dx: &mut [f32]|
         -> () { backward_rows(s, cols, y, dy, dx) })
    });
}

#[inline(always)]
fn forward_rows<S: Simd>(s: S, cols: usize, x: &[f32], y: &mut [f32]) {
    for (x, y) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
        let mut max = s.splat(f32::NEG_INFINITY);
        for c in (0..cols).step_by(S::LANES) {
            max = s.max(s.load_or(&x[c..], f32::NEG_INFINITY), max);
        }
        let max = s.splat(s.reduce_max(max));
        // Tail lanes load −∞ and so add exp(−∞) = 0 to the sum.
        let mut sum = s.zero();
        for c in (0..cols).step_by(S::LANES) {
            let e = exp(s, s.sub(s.load_or(&x[c..], f32::NEG_INFINITY), max));
            sum = s.add(sum, e);
            s.store_or(&mut y[c..], e);
        }
        let inv = 1.0 / s.reduce_sum(sum);
        for c in (0..cols).step_by(S::LANES) {
            let v = s.mul(s.load_or(&y[c..], 0.0), s.splat(inv));
            s.store_or(&mut y[c..], v);
        }
    }
}

#[inline(always)]
fn backward_rows<S: Simd>(s: S, cols: usize, y: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((y, dy), dx) in y
        .chunks_exact(cols)
        .zip(dy.chunks_exact(cols))
        .zip(dx.chunks_exact_mut(cols))
    {
        let dot = s.splat(dot(s, y, dy));
        for c in (0..cols).step_by(S::LANES) {
            let (yv, g) = (s.load_or(&y[c..], 0.0), s.load_or(&dy[c..], 0.0));
            s.store_or(&mut dx[c..], s.mul(yv, s.sub(g, dot)));
        }
    }
}

/// Mean over rows of `−log softmax(logits)[target]`. Writes the softmax into `probs` (saved for
/// the backward) and returns the loss. Targets must be `< cols` (checked by `ops`).
pub fn cross_entropy_forward<F: Float>(
    cols: usize,
    logits: &[F],
    targets: &[usize],
    probs: &mut [F],
) -> F {
    softmax_forward(cols, logits, probs);
    let mut loss = F::ZERO;
    for (row, &t) in probs.chunks_exact(cols).zip(targets) {
        loss -= row[t].ln();
    }
    loss / F::from_usize(targets.len())
}

/// `dlogits = dloss · (softmax − onehot(target)) / rows`.
pub fn cross_entropy_backward<F: Float>(
    cols: usize,
    probs: &[F],
    targets: &[usize],
    dloss: F,
    dlogits: &mut [F],
) {
    let scale = dloss / F::from_usize(targets.len());
    for ((p, d), &t) in probs
        .chunks_exact(cols)
        .zip(dlogits.chunks_exact_mut(cols))
        .zip(targets)
    {
        for (d, &p) in d.iter_mut().zip(p) {
            *d = p * scale;
        }
        d[t] -= scale;
    }
}

/// Rows per parallel task of the distillation KL: a row is a whole vocabulary (tens of
/// thousands of columns), so a few rows already amortise a task.
const KL_ROWS_PER_TASK: usize = 4;

/// Distillation of a distribution per row: `q = softmax(teacher/T)`, `p = softmax(student/T)`.
/// Returns `Σ_rows KL(q ‖ p)` and writes `p − q` (the gradient's direction) into `diff`. Log
/// probabilities come from log-sum-exp, never from `ln p`, so a probability that underflows
/// costs no precision; two exponentials per element, rows split over the threads.
pub fn kl_divergence_forward<F: Float>(
    cols: usize,
    temperature: F,
    student: &[F],
    teacher: &[F],
    diff: &mut [F],
) -> f64 {
    let chunk = KL_ROWS_PER_TASK * cols;
    let mut totals = vec![0.0f64; student.len().div_ceil(chunk.max(1))];
    let items: Vec<_> = student
        .chunks(chunk)
        .zip(teacher.chunks(chunk))
        .zip(diff.chunks_mut(chunk))
        .zip(totals.iter_mut())
        .collect();
    threads::parallel_each(items, |(((s, t), d), total)| {
        let mut exp_teacher = vec![F::ZERO; cols];
        let mut sum = 0.0;
        for ((s, t), d) in s
            .chunks_exact(cols)
            .zip(t.chunks_exact(cols))
            .zip(d.chunks_exact_mut(cols))
        {
            sum += kl_row(temperature, s, t, d, &mut exp_teacher);
        }
        *total = sum;
    });
    totals.iter().sum()
}

/// One row of [`kl_divergence_forward`]; `exp_teacher` is scratch of the row's length.
fn kl_row<F: Float>(temperature: F, s: &[F], t: &[F], d: &mut [F], exp_teacher: &mut [F]) -> f64 {
    let t_inv = F::ONE / temperature;
    let max = |x: &[F]| x.iter().fold(F::neg_infinity(), |m, &v| m.max(v)) * t_inv;
    let (max_s, max_t) = (max(s), max(t));
    let (mut sum_s, mut sum_t) = (F::ZERO, F::ZERO);
    for (((&s, &t), d), e) in s
        .iter()
        .zip(t)
        .zip(d.iter_mut())
        .zip(exp_teacher.iter_mut())
    {
        *d = (s * t_inv - max_s).exp();
        *e = (t * t_inv - max_t).exp();
        sum_s += *d;
        sum_t += *e;
    }
    let (lse_s, lse_t) = (max_s + sum_s.ln(), max_t + sum_t.ln());
    let (inv_s, inv_t) = (F::ONE / sum_s, F::ONE / sum_t);
    let mut kl = 0.0;
    for (((&s, &t), d), &e) in s.iter().zip(t).zip(d.iter_mut()).zip(exp_teacher.iter()) {
        let q = e * inv_t;
        // q (log q − log p), with log q and log p from the log-sum-exps.
        kl += (q * ((t * t_inv - lse_t) - (s * t_inv - lse_s))).to_f64();
        *d = *d * inv_s - q;
    }
    kl
}
