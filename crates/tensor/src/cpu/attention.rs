//! Scaled dot-product attention with a key-padding mask, as one op.
//!
//! Layout: `q`, `k`, `v`, `out` are `[batch, seq, heads·head_dim]` (what the projections produce,
//! so no transpose is needed); `mask` is `[batch, seq]` with 1 for real tokens and 0 for padding.
//! The forward saves one number per query row, `lse = log Σ_j exp(s_ij)` over unmasked keys; the
//! backward recomputes the probabilities from it instead of storing the `seq×seq` matrix
//! (the FlashAttention-2 recipe).

use crate::Float;

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn scale<F: Float>(&self) -> F {
        F::ONE / F::from_usize(self.head_dim).sqrt()
    }

    /// Offset of element `(b, t, h, 0)`.
    #[inline]
    fn at(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.seq + t) * self.width() + h * self.head_dim
    }
}

fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    let mut acc = F::ZERO;
    for (&x, &y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// Scores of query row `i` against every key, masked keys set to −∞.
fn scores_row<F: Float>(s: &AttentionShape, q: &[F], k: &[F], mask: &[F], b: usize, h: usize, i: usize, row: &mut [F]) {
    let d = s.head_dim;
    let qi = &q[s.at(b, i, h)..][..d];
    for (j, out) in row.iter_mut().enumerate() {
        *out = if mask[b * s.seq + j] == F::ZERO {
            F::neg_infinity()
        } else {
            dot(qi, &k[s.at(b, j, h)..][..d]) * s.scale()
        };
    }
}

/// `lse` is `[batch, heads, seq]`.
pub fn attention_forward_reference<F: Float>(
    s: &AttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[F],
    out: &mut [F],
    lse: &mut [F],
) {
    let d = s.head_dim;
    let mut row = vec![F::ZERO; s.seq];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.seq {
                scores_row(s, q, k, mask, b, h, i, &mut row);
                let max = row.iter().fold(F::neg_infinity(), |m, &x| m.max(x));
                let o = &mut out[s.at(b, i, h)..][..d];
                o.iter_mut().for_each(|x| *x = F::ZERO);
                if max == F::neg_infinity() {
                    // Every key is padding: the output is defined as zero.
                    lse[(b * s.heads + h) * s.seq + i] = F::neg_infinity();
                    continue;
                }
                let mut sum = F::ZERO;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                for (j, &p) in row.iter().enumerate() {
                    let vj = &v[s.at(b, j, h)..][..d];
                    for (o, &vv) in o.iter_mut().zip(vj) {
                        *o += p / sum * vv;
                    }
                }
                lse[(b * s.heads + h) * s.seq + i] = max + sum.ln();
            }
        }
    }
}

/// Overwrites `dq`, `dk`, `dv`. With `P = exp(S − lse)`:
/// `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`, `dQ = c·dS·K`, `dK = c·dSᵀ·Q`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_reference<F: Float>(
    s: &AttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[F],
    out: &[F],
    lse: &[F],
    dout: &[F],
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
) {
    let d = s.head_dim;
    let scale: F = s.scale();
    dq.iter_mut().chain(dk.iter_mut()).chain(dv.iter_mut()).for_each(|x| *x = F::ZERO);
    let mut row = vec![F::ZERO; s.seq];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..s.seq {
                let l = lse[(b * s.heads + h) * s.seq + i];
                if l == F::neg_infinity() {
                    continue;
                }
                scores_row(s, q, k, mask, b, h, i, &mut row);
                let oi = s.at(b, i, h);
                let delta = dot(&dout[oi..][..d], &out[oi..][..d]);
                for (j, &sij) in row.iter().enumerate() {
                    if sij == F::neg_infinity() {
                        continue;
                    }
                    let p = (sij - l).exp();
                    let oj = s.at(b, j, h);
                    let dp = dot(&dout[oi..][..d], &v[oj..][..d]);
                    let ds = p * (dp - delta) * scale;
                    for c in 0..d {
                        dv[oj + c] += p * dout[oi + c];
                        dq[oi + c] += ds * k[oj + c];
                        dk[oj + c] += ds * q[oi + c];
                    }
                }
            }
        }
    }
}

pub fn attention_forward<F: Float>(s: &AttentionShape, q: &[F], k: &[F], v: &[F], mask: &[F], out: &mut [F], lse: &mut [F]) {
    attention_forward_reference(s, q, k, v, mask, out, lse)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Float>(
    s: &AttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[F],
    out: &[F],
    lse: &[F],
    dout: &[F],
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
) {
    attention_backward_reference(s, q, k, v, mask, out, lse, dout, dq, dk, dv)
}
