//! Elementwise kernels: the glue between the heavy ops.
//!
//! They are memory-bound, so the fast paths only vectorise and split big arrays over threads.

use crate::cpu::simd::{axpy as axpy_simd, dispatch, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut, task_len};
use crate::{threads, Float};

/// `out = a + b`.
pub fn add_reference<F: Float>(a: &[F], b: &[F], out: &mut [F]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a + b;
    }
}

/// `y += alpha·x`.
pub fn axpy_reference<F: Float>(alpha: F, x: &[F], y: &mut [F]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `x *= alpha`.
pub fn scale_reference<F: Float>(alpha: F, x: &mut [F]) {
    for v in x.iter_mut() {
        *v *= alpha;
    }
}

/// Adds the `cols`-wide `bias` to every row of `x`.
pub fn add_bias_reference<F: Float>(cols: usize, bias: &[F], x: &mut [F]) {
    for row in x.chunks_exact_mut(cols) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// `dbias += Σ_rows dy`.
pub fn bias_backward_reference<F: Float>(cols: usize, dy: &[F], dbias: &mut [F]) {
    for row in dy.chunks_exact(cols) {
        for (d, &g) in dbias.iter_mut().zip(row) {
            *d += g;
        }
    }
}

/// `Σ x²`, accumulated in f64.
pub fn sum_of_squares_reference<F: Float>(x: &[F]) -> f64 {
    x.iter().map(|&v| v.to_f64() * v.to_f64()).sum()
}

/// `Σ x²` in f64 (a gradient norm must neither overflow nor lose small terms, as an f32 sum
/// would), read in place: fixed chunks spread over threads, each summed in eight lanes, and the
/// partial sums added in order, so the result does not depend on the thread count. (It replaced
/// an f64 copy of every gradient: 136 MB a step for a 17M-parameter student.)
pub fn sum_of_squares<F: Float>(x: &[F]) -> f64 {
    fn chunk_sum<F: Float>(x: &[F]) -> f64 {
        let mut lanes = [0.0f64; 8];
        let mut groups = x.chunks_exact(lanes.len());
        for group in &mut groups {
            for (lane, &v) in lanes.iter_mut().zip(group) {
                *lane += v.to_f64() * v.to_f64();
            }
        }
        lanes.iter().sum::<f64>() + sum_of_squares_reference(groups.remainder())
    }
    let chunks: Vec<&[F]> = x.chunks(MIN_ELEMS_PER_TASK).collect();
    let mut partials = vec![0.0f64; chunks.len()];
    threads::parallel_each(
        chunks.into_iter().zip(partials.iter_mut()).collect(),
        |(chunk, partial)| *partial = chunk_sum(chunk),
    );
    partials.iter().sum()
}

/// `out = a + b`.
pub fn add<F: Float>(a: &[F], b: &[F], out: &mut [F]) {
    match (as_f32(a), as_f32(b), as_f32_mut(out)) {
        (Some(a), Some(b), Some(out)) => add_with_isa(Isa::best(), a, b, out),
        _ => add_reference(a, b, out),
    }
}

/// `y += alpha·x`.
pub fn axpy<F: Float>(alpha: F, x: &[F], y: &mut [F]) {
    match (as_f32(x), as_f32_mut(y)) {
        (Some(x), Some(y)) => axpy_with_isa(Isa::best(), alpha.to_f64() as f32, x, y),
        _ => axpy_reference(alpha, x, y),
    }
}

/// `x *= alpha`.
pub fn scale<F: Float>(alpha: F, x: &mut [F]) {
    match as_f32_mut(x) {
        Some(x) => scale_with_isa(Isa::best(), alpha.to_f64() as f32, x),
        None => scale_reference(alpha, x),
    }
}

/// Adds the `cols`-wide `bias` to every row of `x`.
pub fn add_bias<F: Float>(cols: usize, bias: &[F], x: &mut [F]) {
    match (as_f32(bias), as_f32_mut(x)) {
        (Some(bias), Some(x)) => add_bias_with_isa(Isa::best(), cols, bias, x),
        _ => add_bias_reference(cols, bias, x),
    }
}

/// `dbias += Σ_rows dy` (f32: the rows added in the order of [`BIAS_SUM_CHUNK_ROWS`]).
pub fn bias_backward<F: Float>(cols: usize, dy: &[F], dbias: &mut [F]) {
    match (as_f32(dy), as_f32_mut(dbias)) {
        (Some(dy), Some(dbias)) => bias_backward_with_isa(Isa::best(), cols, dy, dbias),
        _ => bias_backward_reference(cols, dy, dbias),
    }
}

/// Below this many elements per task a memory-bound op stays on one thread.
const MIN_ELEMS_PER_TASK: usize = 1 << 16;

pub fn add_with_isa(isa: Isa, a: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(
        a.len() == b.len() && a.len() == out.len(),
        "add: lengths differ"
    );
    let chunk = task_len(a.len(), MIN_ELEMS_PER_TASK);
    let items: Vec<_> = a
        .chunks(chunk)
        .zip(b.chunks(chunk))
        .zip(out.chunks_mut(chunk))
        .collect();
    threads::parallel_each(items, |((a, b), out)| {
        dispatch!(isa, |s, a: &[f32], b: &[f32], out: &mut [f32]| -> () {
            add_body(s, a, b, out)
        })
    });
}

pub fn axpy_with_isa(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: lengths differ");
    let chunk = task_len(x.len(), MIN_ELEMS_PER_TASK);
    let items: Vec<_> = x.chunks(chunk).zip(y.chunks_mut(chunk)).collect();
    threads::parallel_each(items, |(x, y)| {
        dispatch!(isa, |s, alpha: f32, x: &[f32], y: &mut [f32]| -> () {
            axpy_simd(s, alpha, x, y)
        })
    });
}

pub fn scale_with_isa(isa: Isa, alpha: f32, x: &mut [f32]) {
    let chunk = task_len(x.len(), MIN_ELEMS_PER_TASK);
    threads::parallel_each(x.chunks_mut(chunk).collect(), |x| {
        dispatch!(isa, |s, alpha: f32, x: &mut [f32]| -> () {
            scale_body(s, alpha, x)
        })
    });
}

pub fn add_bias_with_isa(isa: Isa, cols: usize, bias: &[f32], x: &mut [f32]) {
    assert_eq!(bias.len(), cols, "add_bias: bias has wrong length");
    if cols == 0 {
        return;
    }
    assert_eq!(
        x.len() % cols,
        0,
        "add_bias: length is not a whole number of rows"
    );
    let chunk = task_len(x.len() / cols, MIN_ELEMS_PER_TASK.div_ceil(cols)) * cols;
    threads::parallel_each(x.chunks_mut(chunk).collect(), |x| {
        dispatch!(isa, |s, cols: usize, bias: &[f32], x: &mut [f32]| -> () {
            for row in x.chunks_exact_mut(cols) {
                axpy_simd(s, 1.0, bias, row);
            }
        })
    });
}

/// The order in which column sums (bias gradients, [`bias_backward`]) add the rows: in chunks
/// of this many, each chunk summed from zero in row order, then the chunk sums added in order.
/// It is the order the bf16 weight-gradient GEMM can follow as it interleaves `dY`, one chunk
/// per task (`gemm_bf16::gemm_bf16_at_b`), so that its bias gradient comes without a pass of
/// its own over `dY` and has these bits.
pub const BIAS_SUM_CHUNK_ROWS: usize = 128;

/// Threads split the columns, so each owns a disjoint piece of `dbias`; rows are added in
/// [`BIAS_SUM_CHUNK_ROWS`] chunks.
pub fn bias_backward_with_isa(isa: Isa, cols: usize, dy: &[f32], dbias: &mut [f32]) {
    assert_eq!(dbias.len(), cols, "bias_backward: dbias has wrong length");
    if cols == 0 {
        return;
    }
    assert_eq!(
        dy.len() % cols,
        0,
        "bias_backward: length is not a whole number of rows"
    );
    let rows = dy.len() / cols;
    let chunk = task_len(cols, MIN_ELEMS_PER_TASK.div_ceil(rows.max(1)));
    let items: Vec<_> = dbias.chunks_mut(chunk).enumerate().collect();
    threads::parallel_each(items, |(part, dbias)| {
        let first = part * chunk;
        dispatch!(isa, |s,
                        cols: usize,
                        first: usize,
                        dy: &[f32],
                        dbias: &mut [f32]|
         -> () {
            let width = dbias.len();
            let mut chunk_sum = vec![0.0f32; width];
            for chunk in dy.chunks(BIAS_SUM_CHUNK_ROWS * cols) {
                chunk_sum.fill(0.0);
                for row in chunk.chunks_exact(cols) {
                    axpy_simd(s, 1.0, &row[first..first + width], &mut chunk_sum);
                }
                axpy_simd(s, 1.0, &chunk_sum, dbias);
            }
        })
    });
}

#[inline(always)]
fn add_body<S: Simd>(s: S, a: &[f32], b: &[f32], out: &mut [f32]) {
    for i in (0..a.len()).step_by(S::LANES) {
        let v = s.add(s.load_or(&a[i..], 0.0), s.load_or(&b[i..], 0.0));
        s.store_or(&mut out[i..], v);
    }
}

#[inline(always)]
fn scale_body<S: Simd>(s: S, alpha: f32, x: &mut [f32]) {
    let alpha = s.splat(alpha);
    for i in (0..x.len()).step_by(S::LANES) {
        let v = s.mul(alpha, s.load_or(&x[i..], 0.0));
        s.store_or(&mut x[i..], v);
    }
}
