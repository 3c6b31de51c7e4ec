//! Scaled dot-product attention with a key-padding mask, as one op.
//!
//! Layout: `q`, `k`, `v`, `out` are `[batch, seq, heads·head_dim]` (what the projections produce,
//! so no transpose is needed); `mask` is `[batch, seq]` with 1 for real tokens and 0 for padding.
//! The forward saves one number per query row, `lse = log Σ_j exp(s_ij)` over unmasked keys; the
//! backward recomputes the probabilities from it instead of storing the `seq×seq` matrix
//! (the FlashAttention-2 recipe).

use crate::cpu::simd::{axpy, dispatch, dot as dot_simd, exp, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut};
use crate::{threads, Float};

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
#[allow(clippy::too_many_arguments)]
fn scores_row<F: Float>(
    s: &AttentionShape,
    q: &[F],
    k: &[F],
    mask: &[F],
    b: usize,
    h: usize,
    i: usize,
    row: &mut [F],
) {
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
    dq.iter_mut()
        .chain(dk.iter_mut())
        .chain(dv.iter_mut())
        .for_each(|x| *x = F::ZERO);
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

pub fn attention_forward<F: Float>(
    s: &AttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
    mask: &[F],
    out: &mut [F],
    lse: &mut [F],
) {
    match (as_f32(q), as_f32(k), as_f32(v), as_f32(mask)) {
        (Some(q), Some(k), Some(v), Some(mask)) => {
            let (out, lse) = (as_f32_mut(out).unwrap(), as_f32_mut(lse).unwrap());
            attention_forward_with_isa(Isa::best(), s, q, k, v, mask, out, lse)
        }
        _ => attention_forward_reference(s, q, k, v, mask, out, lse),
    }
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
    match (
        as_f32(q),
        as_f32(k),
        as_f32(v),
        as_f32(mask),
        as_f32(out),
        as_f32(lse),
        as_f32(dout),
    ) {
        (Some(q), Some(k), Some(v), Some(mask), Some(out), Some(lse), Some(dout)) => {
            let (dq, dk, dv) = (
                as_f32_mut(dq).unwrap(),
                as_f32_mut(dk).unwrap(),
                as_f32_mut(dv).unwrap(),
            );
            attention_backward_with_isa(Isa::best(), s, q, k, v, mask, out, lse, dout, dq, dk, dv)
        }
        _ => attention_backward_reference(s, q, k, v, mask, out, lse, dout, dq, dk, dv),
    }
}

/// Keys per block of scores: the most scores a task ever holds at once.
const KEY_BLOCK: usize = 64;

fn check_lengths(s: &AttentionShape, tensors: &[&[f32]], mask: &[f32], lse: &[f32]) {
    let n = s.batch * s.seq * s.width();
    assert!(
        tensors.iter().all(|t| t.len() == n),
        "attention: q/k/v/out sizes disagree with the shape"
    );
    assert_eq!(
        mask.len(),
        s.batch * s.seq,
        "attention: mask has wrong length"
    );
    assert_eq!(
        lse.len(),
        s.batch * s.heads * s.seq,
        "attention: lse has wrong length"
    );
}

/// Copies head-major `[batch, heads, seq, head_dim]` blocks into the `[batch, seq, heads·head_dim]`
/// layout.
fn scatter_heads(s: &AttentionShape, heads: &[f32], dst: &mut [f32]) {
    let (d, seq) = (s.head_dim, s.seq);
    for (bh, head) in heads.chunks_exact(seq * d).enumerate() {
        let (b, h) = (bh / s.heads, bh % s.heads);
        for (t, row) in head.chunks_exact(d).enumerate() {
            dst[s.at(b, t, h)..][..d].copy_from_slice(row);
        }
    }
}

/// One (batch, head) pair per task. Each task streams key blocks with an online softmax (running
/// max `m` and sum `l`, rescaling the output accumulator when `m` grows), writes its output
/// head-major into scratch, and the scratch is scattered into `out` afterwards.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_with_isa(
    isa: Isa,
    s: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    check_lengths(s, &[q, k, v, out], mask, lse);
    let (seq, d) = (s.seq, s.head_dim);
    if seq == 0 || d == 0 || s.heads == 0 {
        lse.fill(f32::NEG_INFINITY);
        out.fill(0.0);
        return;
    }
    let mut heads_out = vec![0.0f32; s.batch * s.heads * seq * d];
    let items: Vec<_> = heads_out
        .chunks_mut(seq * d)
        .zip(lse.chunks_mut(seq))
        .enumerate()
        .collect();
    let shape = *s;
    threads::parallel_each(items, |(bh, (head_out, head_lse))| {
        dispatch!(isa, |simd,
                        shape: AttentionShape,
                        bh: usize,
                        q: &[f32],
                        k: &[f32],
                        v: &[f32],
                        mask: &[f32],
                        head_out: &mut [f32],
                        head_lse: &mut [f32]|
         -> () {
            forward_head(
                simd,
                &shape,
                bh / shape.heads,
                bh % shape.heads,
                q,
                k,
                v,
                mask,
                head_out,
                head_lse,
            )
        })
    });
    scatter_heads(s, &heads_out, out);
}

/// Head `h` of batch `b` of `x` (keys or values) transposed to `[head_dim, seq_pad]`, padding
/// zero, so that a block of dot products against it is `head_dim` vector FMAs.
fn transpose_head(s: &AttentionShape, x: &[f32], b: usize, h: usize, seq_pad: usize) -> Vec<f32> {
    let d = s.head_dim;
    let mut xt = vec![0.0f32; d * seq_pad];
    for j in 0..s.seq {
        for (c, &v) in x[s.at(b, j, h)..][..d].iter().enumerate() {
            xt[c * seq_pad + j] = v;
        }
    }
    xt
}

/// The additive key mask of batch `b`: 0 for tokens, −∞ for padding and for `j ≥ seq`.
fn key_bias(s: &AttentionShape, mask: &[f32], b: usize, seq_pad: usize) -> Vec<f32> {
    let mut bias = vec![f32::NEG_INFINITY; seq_pad];
    for (bias, &m) in bias.iter_mut().zip(&mask[b * s.seq..(b + 1) * s.seq]) {
        *bias = if m == 0.0 { f32::NEG_INFINITY } else { 0.0 };
    }
    bias
}

/// `scores[j - j0] = bias[j] + Σ_c q[c]·kt[c][j]` for the key block starting at `j0`.
#[inline(always)]
fn score_block<S: Simd>(
    simd: S,
    q: &[f32],
    kt: &[f32],
    bias: &[f32],
    seq_pad: usize,
    j0: usize,
    scores: &mut [f32],
) {
    for (g, scores) in scores.chunks_exact_mut(S::LANES).enumerate() {
        let j = j0 + g * S::LANES;
        let mut acc = simd.load(&bias[j..]);
        for (c, &qc) in q.iter().enumerate() {
            acc = simd.mul_add(simd.splat(qc), simd.load(&kt[c * seq_pad + j..]), acc);
        }
        simd.store(scores, acc);
    }
}

/// Rounds `seq` up to whole vectors.
fn padded<S: Simd>(seq: usize) -> usize {
    seq.div_ceil(S::LANES) * S::LANES
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_head<S: Simd>(
    simd: S,
    s: &AttentionShape,
    b: usize,
    h: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    head_out: &mut [f32],
    head_lse: &mut [f32],
) {
    let (seq, d) = (s.seq, s.head_dim);
    let seq_pad = padded::<S>(seq);
    let (kt, bias) = (
        transpose_head(s, k, b, h, seq_pad),
        key_bias(s, mask, b, seq_pad),
    );
    let scale = 1.0 / (d as f32).sqrt();
    let mut q_scaled = vec![0.0f32; d];
    let mut scores = [0.0f32; KEY_BLOCK];
    for (i, (o, lse)) in head_out
        .chunks_exact_mut(d)
        .zip(head_lse.iter_mut())
        .enumerate()
    {
        q_scaled
            .iter_mut()
            .zip(&q[s.at(b, i, h)..][..d])
            .for_each(|(qs, &x)| *qs = x * scale);
        o.fill(0.0);
        let (mut m, mut l) = (f32::NEG_INFINITY, 0.0f32);
        for j0 in (0..seq_pad).step_by(KEY_BLOCK) {
            let block = KEY_BLOCK.min(seq_pad - j0);
            let scores = &mut scores[..block];
            score_block(simd, &q_scaled, &kt, &bias, seq_pad, j0, scores);
            let mut block_max = simd.splat(f32::NEG_INFINITY);
            for g in scores.chunks_exact(S::LANES) {
                block_max = simd.max(simd.load(g), block_max);
            }
            let m_new = m.max(simd.reduce_max(block_max));
            if m_new == f32::NEG_INFINITY {
                continue; // every key so far is masked
            }
            let correction = (m - m_new).exp();
            l *= correction;
            scale_in_place(simd, correction, o);
            let mut sum = simd.zero();
            for g in scores.chunks_exact_mut(S::LANES) {
                let p = exp(simd, simd.sub(simd.load(g), simd.splat(m_new)));
                sum = simd.add(sum, p);
                simd.store(g, p);
            }
            l += simd.reduce_sum(sum);
            for (j, &p) in (j0..seq.min(j0 + block)).zip(scores.iter()) {
                if p != 0.0 {
                    axpy(simd, p, &v[s.at(b, j, h)..][..d], o);
                }
            }
            m = m_new;
        }
        if m == f32::NEG_INFINITY {
            *lse = f32::NEG_INFINITY; // every key is padding: output stays zero
        } else {
            scale_in_place(simd, 1.0 / l, o);
            *lse = m + l.ln();
        }
    }
}

#[inline(always)]
fn scale_in_place<S: Simd>(simd: S, alpha: f32, x: &mut [f32]) {
    let alpha = simd.splat(alpha);
    for c in (0..x.len()).step_by(S::LANES) {
        let v = simd.mul(alpha, simd.load_or(&x[c..], 0.0));
        simd.store_or(&mut x[c..], v);
    }
}

/// One (batch, head) pair per task, recomputing each probability from `lse` a block of keys at
/// a time; gradients go to head-major scratch and are scattered afterwards.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with_isa(
    isa: Isa,
    s: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    check_lengths(s, &[q, k, v, out, dout, dq, dk, dv], mask, lse);
    let (seq, d) = (s.seq, s.head_dim);
    if seq == 0 || d == 0 || s.heads == 0 {
        return;
    }
    let n = s.batch * s.heads * seq * d;
    let mut grads = vec![0.0f32; 3 * n];
    let (gq, rest) = grads.split_at_mut(n);
    let (gk, gv) = rest.split_at_mut(n);
    let items: Vec<_> = gq
        .chunks_mut(seq * d)
        .zip(gk.chunks_mut(seq * d))
        .zip(gv.chunks_mut(seq * d))
        .enumerate()
        .collect();
    let shape = *s;
    threads::parallel_each(items, |(bh, ((dq_h, dk_h), dv_h))| {
        dispatch!(isa, |simd,
                        shape: AttentionShape,
                        bh: usize,
                        q: &[f32],
                        k: &[f32],
                        v: &[f32],
                        mask: &[f32],
                        out: &[f32],
                        lse: &[f32],
                        dout: &[f32],
                        dq_h: &mut [f32],
                        dk_h: &mut [f32],
                        dv_h: &mut [f32]|
         -> () {
            let lse = &lse[bh * shape.seq..(bh + 1) * shape.seq];
            let grads = HeadGrads {
                dq: dq_h,
                dk: dk_h,
                dv: dv_h,
            };
            backward_head(
                simd,
                &shape,
                bh / shape.heads,
                bh % shape.heads,
                q,
                k,
                v,
                mask,
                out,
                lse,
                dout,
                grads,
            )
        })
    });
    scatter_heads(s, &grads[..n], dq);
    scatter_heads(s, &grads[n..2 * n], dk);
    scatter_heads(s, &grads[2 * n..], dv);
}

/// One head's gradients, `[seq, head_dim]` each.
struct HeadGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head<S: Simd>(
    simd: S,
    s: &AttentionShape,
    b: usize,
    h: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    g: HeadGrads,
) {
    let (seq, d) = (s.seq, s.head_dim);
    let seq_pad = padded::<S>(seq);
    let (kt, bias) = (
        transpose_head(s, k, b, h, seq_pad),
        key_bias(s, mask, b, seq_pad),
    );
    // dP = dO·Vᵀ for a block of keys is computed exactly like the scores.
    let vt = transpose_head(s, v, b, h, seq_pad);
    let scale = 1.0 / (d as f32).sqrt();
    let mut q_scaled = vec![0.0f32; d];
    let (mut p, mut ds) = ([0.0f32; KEY_BLOCK], [0.0f32; KEY_BLOCK]);
    let no_bias = vec![0.0f32; seq_pad];
    for (i, &l) in lse.iter().enumerate() {
        if l == f32::NEG_INFINITY {
            continue;
        }
        let (qi, oi) = (&q[s.at(b, i, h)..][..d], s.at(b, i, h));
        let (dout_i, out_i) = (&dout[oi..][..d], &out[oi..][..d]);
        q_scaled
            .iter_mut()
            .zip(qi)
            .for_each(|(qs, &x)| *qs = x * scale);
        let delta = simd.splat(dot_simd(simd, dout_i, out_i));
        for j0 in (0..seq_pad).step_by(KEY_BLOCK) {
            let block = KEY_BLOCK.min(seq_pad - j0);
            score_block(simd, &q_scaled, &kt, &bias, seq_pad, j0, &mut p[..block]);
            score_block(simd, dout_i, &vt, &no_bias, seq_pad, j0, &mut ds[..block]);
            for (pg, dsg) in p[..block]
                .chunks_exact_mut(S::LANES)
                .zip(ds[..block].chunks_exact_mut(S::LANES))
            {
                // P = exp(S − lse); dS = c·P∘(dP − δ).
                let pv = exp(simd, simd.sub(simd.load(pg), simd.splat(l)));
                let dsv = simd.mul(
                    simd.mul(pv, simd.sub(simd.load(dsg), delta)),
                    simd.splat(scale),
                );
                simd.store(pg, pv);
                simd.store(dsg, dsv);
            }
            let dq_i = &mut g.dq[i * d..(i + 1) * d];
            for (j, (&pj, &dsj)) in (j0..seq.min(j0 + block)).zip(p.iter().zip(ds.iter())) {
                if pj == 0.0 {
                    continue; // masked key (or underflow): contributes nothing
                }
                let kj = &k[s.at(b, j, h)..][..d];
                axpy(simd, pj, dout_i, &mut g.dv[j * d..(j + 1) * d]);
                axpy(simd, dsj, kj, dq_i);
                axpy(simd, dsj, qi, &mut g.dk[j * d..(j + 1) * d]);
            }
        }
    }
}
