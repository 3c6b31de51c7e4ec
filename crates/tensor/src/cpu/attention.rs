//! Scaled dot-product attention with a key-padding mask, as one op.
//!
//! Layout: `q`, `k`, `v`, `out` are `[batch, seq, heads·head_dim]` (what the projections produce,
//! so no transpose is needed); `mask` is `[batch, seq]` with 1 for real tokens and 0 for padding.
//! The forward saves one number per query row, `lse = log Σ_j exp(s_ij)` over unmasked keys; the
//! backward recomputes the probabilities from it instead of storing the `seq×seq` matrix
//! (the FlashAttention-2 recipe).

use crate::cpu::gemm::{gemm_on_this_thread, Activation, GemmShape};
use crate::cpu::gemm_bf16::{gemm_bf16_packed, Bf16Path, PackedBf16Weight};
use crate::cpu::simd::{dispatch, dot as dot_simd, exp, Isa, Simd};
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

pub(crate) fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    let mut acc = F::ZERO;
    for (&x, &y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// The scalar backward's term for query row `oi` and key row `oj` (element offsets) with
/// probability `p` and score gradient `ds`: `dV_j += p·dO_i`, `dQ_i += ds·K_j`, `dK_j += ds·Q_i`.
pub(crate) fn add_pair_grads<F: Float>(
    d: usize,
    p: F,
    ds: F,
    (oi, oj): (usize, usize),
    (q, k, dout): (&[F], &[F], &[F]),
    (dq, dk, dv): (&mut [F], &mut [F], &mut [F]),
) {
    for c in 0..d {
        dv[oj + c] += p * dout[oi + c];
        dq[oi + c] += ds * k[oj + c];
        dk[oj + c] += ds * q[oi + c];
    }
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
                    add_pair_grads(
                        d,
                        p,
                        ds,
                        (oi, oj),
                        (q, k, dout),
                        (&mut *dq, &mut *dk, &mut *dv),
                    );
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

/// Query rows per block: a task holds the scores of `QUERY_BLOCK` rows against every key (and,
/// in the backward, their gradients) at a time, never the whole `seq×seq` matrix.
const QUERY_BLOCK: usize = 64;

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

/// Head `h` of batch `b` of `x` gathered into contiguous `[seq, head_dim]` rows, so that every
/// product below is a plain GEMM.
fn gather_head(s: &AttentionShape, x: &[f32], b: usize, h: usize) -> Vec<f32> {
    let d = s.head_dim;
    let mut rows = Vec::with_capacity(s.seq * d);
    for t in 0..s.seq {
        rows.extend_from_slice(&x[s.at(b, t, h)..][..d]);
    }
    rows
}

/// The additive key mask of batch `b`: 0 for tokens, −∞ for padding.
fn key_bias(s: &AttentionShape, mask: &[f32], b: usize) -> Vec<f32> {
    mask[b * s.seq..(b + 1) * s.seq]
        .iter()
        .map(|&m| if m == 0.0 { f32::NEG_INFINITY } else { 0.0 })
        .collect()
}

/// `rows×seq` scores `Q[i0..i0+rows]·Kᵀ` (unscaled) into `scores`.
fn block_scores(isa: Isa, d: usize, seq: usize, q_rows: &[f32], k: &[f32], scores: &mut [f32]) {
    let rows = q_rows.len() / d;
    let shape = GemmShape {
        m: rows,
        n: seq,
        k: d,
        trans_a: false,
        trans_b: true,
    };
    gemm_on_this_thread(isa, shape, q_rows, k, scores, 0.0);
}

/// What the forward's two products multiply in.
#[derive(Clone, Copy, Debug)]
enum Products {
    /// f32 GEMMs on this ISA.
    F32(Isa),
    /// bf16 GEMMs with f32 accumulation on this path: `Q` and `P` rounded at the GEMM's input,
    /// `K` and `V` rounded as each head packs them.
    Bf16(Bf16Path),
}

/// One (batch, head) pair per task. Per block of query rows: the scores against every key (one
/// GEMM), a masked softmax per row that also yields `lse`, then `O = P·V` (another GEMM). The
/// output goes head-major into scratch and is scattered into `out` afterwards.
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
    isa.assert_supported();
    forward_with(Products::F32(isa), s, q, k, v, mask, out, lse)
}

/// [`attention_forward_with_isa`] with both products in bf16 on `path` (f32 accumulation, the
/// softmax and `lse` in f32): inference's bf16 attention. Its backward would have to recompute
/// the same rounded scores, so there is none: a training forward stays f32.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward_bf16(
    path: Bf16Path,
    s: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    path.assert_supported();
    forward_with(Products::Bf16(path), s, q, k, v, mask, out, lse)
}

#[allow(clippy::too_many_arguments)]
fn forward_with(
    products: Products,
    s: &AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    check_lengths(s, &[q, k, v, out], mask, lse);
    // The softmax's ISA: the f32 products' own, else the best.
    let isa = match products {
        Products::F32(isa) => isa,
        Products::Bf16(_) => Isa::best(),
    };
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
    threads::parallel_each(items, |(bh, (head_out, head_lse))| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let (q_h, k_h, v_h) = (
            gather_head(s, q, b, h),
            gather_head(s, k, b, h),
            gather_head(s, v, b, h),
        );
        let bias = key_bias(s, mask, b);
        let bias = bias.as_slice();
        let scale = 1.0 / (d as f32).sqrt();
        // bf16: `K` (`[seq, d]`) packed as the scores' weight, `V` (`[seq, d]`, the output's
        // `Vᵀ` stored transposed) as the output's; each head once, for all its query blocks.
        let packed = match products {
            Products::F32(_) => None,
            Products::Bf16(path) => Some((
                PackedBf16Weight::pack(path, &k_h, seq, d),
                PackedBf16Weight::pack_transposed(path, &v_h, d, seq),
            )),
        };
        let mut p = vec![0.0f32; QUERY_BLOCK.min(seq) * seq];
        for i0 in (0..seq).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(seq - i0);
            let p = &mut p[..rows * seq];
            let q_rows = &q_h[i0 * d..(i0 + rows) * d];
            match &packed {
                None => block_scores(isa, d, seq, q_rows, &k_h, p),
                Some((k_packed, _)) => {
                    gemm_bf16_packed(q_rows, rows, k_packed, None, Activation::Identity, p)
                }
            }
            for (row, lse) in p.chunks_exact_mut(seq).zip(&mut head_lse[i0..i0 + rows]) {
                *lse = dispatch!(isa, |simd,
                                       scale: f32,
                                       bias: &[f32],
                                       row: &mut [f32]|
                 -> f32 {
                    softmax_row(simd, scale, bias, row)
                });
            }
            let shape = GemmShape {
                m: rows,
                n: d,
                k: seq,
                trans_a: false,
                trans_b: false,
            };
            let o = &mut head_out[i0 * d..(i0 + rows) * d];
            match &packed {
                None => gemm_on_this_thread(isa, shape, p, &v_h, o, 0.0),
                Some((_, v_packed)) => {
                    gemm_bf16_packed(p, rows, v_packed, None, Activation::Identity, o)
                }
            }
        }
    });
    scatter_heads(s, &heads_out, out);
}

/// Turns one row of raw scores into probabilities `softmax(scale·row + bias)` in place and
/// returns `lse = log Σ_j exp(scale·row_j + bias_j)`. A row whose keys are all masked becomes
/// zeros with `lse = −∞`, so its output is zero.
#[inline(always)]
pub(crate) fn softmax_row<S: Simd>(simd: S, scale: f32, bias: &[f32], row: &mut [f32]) -> f32 {
    let (n, lanes) = (row.len(), S::LANES);
    let scale_v = simd.splat(scale);
    let mut max = simd.splat(f32::NEG_INFINITY);
    for j in (0..n).step_by(lanes) {
        let x = simd.mul_add(
            scale_v,
            simd.load_or(&row[j..], 0.0),
            simd.load_or(&bias[j..n], f32::NEG_INFINITY),
        );
        simd.store_or(&mut row[j..], x);
        max = simd.max(x, max);
    }
    let m = simd.reduce_max(max);
    if m == f32::NEG_INFINITY {
        row.fill(0.0);
        return f32::NEG_INFINITY;
    }
    let mut sum = simd.zero();
    for j in (0..n).step_by(lanes) {
        let p = exp(simd, simd.sub(simd.load_or(&row[j..], 0.0), simd.splat(m)));
        simd.store_or(&mut row[j..], p);
        sum = simd.add(sum, simd.load_or(&row[j..], 0.0));
    }
    let l = simd.reduce_sum(sum);
    let inv = simd.splat(1.0 / l);
    for j in (0..n).step_by(lanes) {
        let p = simd.mul(inv, simd.load_or(&row[j..], 0.0));
        simd.store_or(&mut row[j..], p);
    }
    m + l.ln()
}

/// One (batch, head) pair per task. Per block of query rows the probabilities are recomputed
/// from `lse` (scores by one GEMM) alongside `dP = dO·Vᵀ` (another), turned into
/// `dS = scale·P∘(dP − δ)`, and three GEMMs finish the block: `dV += Pᵀ·dO`, `dK += dSᵀ·Q`,
/// `dQ = dS·K`. Gradients go to head-major scratch and are scattered afterwards.
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
    isa.assert_supported();
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
    threads::parallel_each(items, |(bh, ((dq_h, dk_h), dv_h))| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let [q_h, k_h, v_h, out_h, dout_h] = [q, k, v, out, dout].map(|x| gather_head(s, x, b, h));
        let bias = key_bias(s, mask, b);
        let bias = bias.as_slice();
        let lse = &lse[bh * seq..(bh + 1) * seq];
        let scale = 1.0 / (d as f32).sqrt();
        let block = QUERY_BLOCK.min(seq) * seq;
        let (mut p, mut ds) = (vec![0.0f32; block], vec![0.0f32; block]);
        for i0 in (0..seq).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(seq - i0);
            let blk = i0 * d..(i0 + rows) * d;
            let (p, ds) = (&mut p[..rows * seq], &mut ds[..rows * seq]);
            block_scores(isa, d, seq, &q_h[blk.clone()], &k_h, p);
            block_scores(isa, d, seq, &dout_h[blk.clone()], &v_h, ds);
            for (r, (p_row, ds_row)) in p
                .chunks_exact_mut(seq)
                .zip(ds.chunks_exact_mut(seq))
                .enumerate()
            {
                let i = i0 + r;
                let (dout_i, out_i) = (&dout_h[i * d..(i + 1) * d], &out_h[i * d..(i + 1) * d]);
                let lse_i = lse[i];
                dispatch!(isa, |simd,
                                scale: f32,
                                bias: &[f32],
                                lse_i: f32,
                                dout_i: &[f32],
                                out_i: &[f32],
                                p_row: &mut [f32],
                                ds_row: &mut [f32]|
                 -> () {
                    let delta = dot_simd(simd, dout_i, out_i);
                    score_grads_row(simd, scale, bias, lse_i, delta, p_row, ds_row)
                });
            }
            // Each key's gradients sum over every query block: the first block overwrites.
            let beta = if i0 == 0 { 0.0 } else { 1.0 };
            let keys_from_block = GemmShape {
                m: seq,
                n: d,
                k: rows,
                trans_a: true,
                trans_b: false,
            };
            gemm_on_this_thread(isa, keys_from_block, p, &dout_h[blk.clone()], dv_h, beta);
            gemm_on_this_thread(isa, keys_from_block, ds, &q_h[blk.clone()], dk_h, beta);
            let queries = GemmShape {
                m: rows,
                n: d,
                k: seq,
                trans_a: false,
                trans_b: false,
            };
            gemm_on_this_thread(isa, queries, ds, &k_h, &mut dq_h[blk], 0.0);
        }
    });
    scatter_heads(s, &grads[..n], dq);
    scatter_heads(s, &grads[n..2 * n], dk);
    scatter_heads(s, &grads[2 * n..], dv);
}

/// For one query row, given raw scores in `p_row` and `dP` in `ds_row`: `p_row` becomes
/// `P = exp(scale·s + bias − lse)` and `ds_row` becomes `dS = scale·P∘(dP − δ)`, the gradient
/// with respect to the unscaled scores. A row with `lse = −∞` (every key masked) had a zero
/// output, so both rows become zero.
#[inline(always)]
pub(crate) fn score_grads_row<S: Simd>(
    simd: S,
    scale: f32,
    bias: &[f32],
    lse: f32,
    delta: f32,
    p_row: &mut [f32],
    ds_row: &mut [f32],
) {
    if lse == f32::NEG_INFINITY {
        p_row.fill(0.0);
        ds_row.fill(0.0);
        return;
    }
    let n = p_row.len();
    let (scale_v, lse_v, delta_v) = (simd.splat(scale), simd.splat(lse), simd.splat(delta));
    for j in (0..n).step_by(S::LANES) {
        let logit = simd.mul_add(
            scale_v,
            simd.load_or(&p_row[j..], 0.0),
            simd.load_or(&bias[j..n], f32::NEG_INFINITY),
        );
        let p = exp(simd, simd.sub(logit, lse_v));
        let ds = simd.mul(
            scale_v,
            simd.mul(p, simd.sub(simd.load_or(&ds_row[j..], 0.0), delta_v)),
        );
        simd.store_or(&mut p_row[j..], p);
        simd.store_or(&mut ds_row[j..], ds);
    }
}
