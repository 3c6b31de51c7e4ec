//! Rotary position embeddings as Hugging Face's Llama applies them ("rotate half"): within each
//! head of `head_dim` channels, channel `i` and channel `i + head_dim/2` are rotated together by
//! the angle `position·θ^(−2i/head_dim)`:
//! `y_i = x_i·cos − x_{i+h}·sin`, `y_{i+h} = x_{i+h}·cos + x_i·sin`.
//! The backward is the rotation by the opposite angle, so one kernel serves both.
//!
//! Layout: `x` is `[batch, seq, heads·head_dim]`; `positions` gives each of the `seq` rows its
//! position (the same for every sequence of the batch), so a decoding step with a cache of `p`
//! tokens passes `p, p+1, …`.

use crate::Float;

/// `cos` and `sin` of every (row, frequency) pair: `[seq, head_dim/2]` each.
#[derive(Clone, Debug)]
pub struct RopeTable<F> {
    pub head_dim: usize,
    pub cos: Vec<F>,
    pub sin: Vec<F>,
}

impl<F: Float> RopeTable<F> {
    /// The angles as transformers computes them, in f32: the inverse frequencies
    /// `1/θ^(2i/d)` and their products with the positions are rounded to f32 (the cosine and
    /// sine of that f32 angle are then taken in f64), so both sides rotate by the same angles
    /// (an f32 angle near position 500 is only good to about 3e-5).
    pub fn new(head_dim: usize, theta: f64, positions: &[usize]) -> RopeTable<F> {
        assert!(
            head_dim.is_multiple_of(2),
            "rope: head_dim {head_dim} is odd"
        );
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| inverse_frequency(head_dim, theta, i))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &inv_freq {
                let angle = f64::from(p as f32 * f);
                cos.push(F::from_f64(angle.cos()));
                sin.push(F::from_f64(angle.sin()));
            }
        }
        RopeTable { head_dim, cos, sin }
    }

    pub fn rows(&self) -> usize {
        self.cos.len() / (self.head_dim / 2).max(1)
    }
}

/// `1/θ^(2i/d)` in f32, the power taken in f64 of the f32 operands and rounded once: the
/// device kernel (`kernels/rope.cu`) computes exactly this, so both rotate by the same angles.
/// It equals f32 `powf` (transformers' f32 power) at every θ ∈ {1e4, 1e5, 5e5, 1e6} and d ∈
/// {6, 8, 10, 16, 20, 32, 64, 128}; glibc's `powf` itself is misrounded for 0.07 % of the
/// (θ, d, i) triples up to d = 512, which no device library would reproduce.
pub fn inverse_frequency(head_dim: usize, theta: f64, i: usize) -> f32 {
    let exponent = (2 * i) as f32 / head_dim as f32;
    1.0 / (f64::from(theta as f32).powf(f64::from(exponent)) as f32)
}

/// Which way to rotate: the forward, or its transpose (the backward of the forward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    Forward,
    Inverse,
}

/// Writes the rotated `x` into `y`; both are rows of `width = heads·head_dim` values, `seq =
/// table.rows()` rows per sequence.
pub fn rope<F: Float>(
    table: &RopeTable<F>,
    rotation: Rotation,
    width: usize,
    x: &[F],
    y: &mut [F],
) {
    let (d, seq) = (table.head_dim, table.rows());
    assert_eq!(x.len(), y.len(), "rope: x and y differ in length");
    assert!(
        d > 0 && width.is_multiple_of(d) && seq > 0 && x.len().is_multiple_of(seq * width),
        "rope: {} elements are not rows of {seq} positions × {width} channels in heads of {d}",
        x.len()
    );
    // One loop for every dtype: a multiply-add pass over memory that the compiler vectorises
    // as written (the direction is a sign, not a branch), small beside the projections around it.
    let half = d / 2;
    let sign = match rotation {
        Rotation::Forward => F::ONE,
        Rotation::Inverse => -F::ONE,
    };
    for (r, (xr, yr)) in x
        .chunks_exact(width)
        .zip(y.chunks_exact_mut(width))
        .enumerate()
    {
        let t = r % seq;
        let c = &table.cos[t * half..(t + 1) * half];
        let s = &table.sin[t * half..(t + 1) * half];
        for (xh, yh) in xr.chunks_exact(d).zip(yr.chunks_exact_mut(d)) {
            let (x1, x2) = xh.split_at(half);
            let (y1, y2) = yh.split_at_mut(half);
            for i in 0..half {
                let s = sign * s[i];
                y1[i] = x1[i] * c[i] - x2[i] * s;
                y2[i] = x2[i] * c[i] + x1[i] * s;
            }
        }
    }
}
