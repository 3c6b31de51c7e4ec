//! Causal grouped-query attention (Llama's self-attention after the projections and RoPE), as
//! one op: `softmax(q·kᵀ/√d + causal)·v` per query head, where `heads/kv_heads` query heads share
//! each key/value head (transformers' `repeat_kv`: query head `h` reads key/value head
//! `h / (heads/kv_heads)`).
//!
//! Layout: `q`, `out` are `[batch, q_len, heads·head_dim]`; `k`, `v` are
//! `[batch, kv_len, kv_heads·head_dim]` with `kv_len ≥ q_len`. The queries are the last `q_len`
//! positions of the `kv_len` keys (a decoding step with a cache of `kv_len − q_len` tokens), so
//! query `i` sees keys `0 ..= kv_len − q_len + i`. The forward saves the per-row log-sum-exp
//! (`[batch, heads, q_len]`) and the backward recomputes the probabilities from it, as the
//! encoder's attention (`cpu::attention`) does; its row kernels are shared.

use crate::cpu::attention::{add_pair_grads, dot, score_grads_row, softmax_row};
use crate::cpu::gemm::{gemm_on_this_thread, GemmShape};
use crate::cpu::simd::{dispatch, dot as dot_simd, Isa};
use crate::cpu::{as_f32, as_f32_mut};
use crate::{threads, Float};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CausalAttentionShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl CausalAttentionShape {
    /// Keys before the first query (the cached tokens).
    pub fn offset(&self) -> usize {
        self.kv_len - self.q_len
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Keys query row `i` attends to.
    fn visible(&self, i: usize) -> usize {
        self.offset() + i + 1
    }

    fn scale<F: Float>(&self) -> F {
        F::ONE / F::from_usize(self.head_dim).sqrt()
    }

    /// Offset of query element `(b, t, h, 0)`.
    fn q_at(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.q_len + t) * self.heads * self.head_dim + h * self.head_dim
    }

    /// Offset of key/value element `(b, t, g, 0)`.
    fn kv_at(&self, b: usize, t: usize, g: usize) -> usize {
        (b * self.kv_len + t) * self.kv_heads * self.head_dim + g * self.head_dim
    }

    fn check<F>(&self, q: &[F], k: &[F], v: &[F], out: &[F], lse: &[F]) {
        assert!(
            self.kv_heads > 0
                && self.heads.is_multiple_of(self.kv_heads)
                && self.kv_len >= self.q_len,
            "causal attention: bad shape {self:?}"
        );
        let q_n = self.batch * self.q_len * self.heads * self.head_dim;
        let kv_n = self.batch * self.kv_len * self.kv_heads * self.head_dim;
        assert!(
            q.len() == q_n && out.len() == q_n,
            "causal attention: q/out sizes disagree with {self:?}"
        );
        assert!(
            k.len() == kv_n && v.len() == kv_n,
            "causal attention: k/v sizes disagree with {self:?}"
        );
        assert_eq!(
            lse.len(),
            self.batch * self.heads * self.q_len,
            "causal attention: lse has wrong length"
        );
    }
}

/// Scaled scores of query row `(b, i, h)` against its visible keys, into `row[..visible]`.
#[allow(clippy::too_many_arguments)]
fn scores_row<F: Float>(
    s: &CausalAttentionShape,
    q: &[F],
    k: &[F],
    b: usize,
    i: usize,
    h: usize,
    row: &mut [F],
) {
    let d = s.head_dim;
    let qi = &q[s.q_at(b, i, h)..][..d];
    let g = h / s.group();
    for (j, out) in row.iter_mut().enumerate() {
        *out = dot(qi, &k[s.kv_at(b, j, g)..][..d]) * s.scale();
    }
}

pub fn causal_attention_forward_reference<F: Float>(
    s: &CausalAttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
    out: &mut [F],
    lse: &mut [F],
) {
    s.check(q, k, v, out, lse);
    let d = s.head_dim;
    let mut row = vec![F::ZERO; s.kv_len];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let g = h / s.group();
            for i in 0..s.q_len {
                let row = &mut row[..s.visible(i)];
                scores_row(s, q, k, b, i, h, row);
                let max = row.iter().fold(F::neg_infinity(), |m, &x| m.max(x));
                let mut sum = F::ZERO;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let o = &mut out[s.q_at(b, i, h)..][..d];
                o.iter_mut().for_each(|x| *x = F::ZERO);
                for (j, &p) in row.iter().enumerate() {
                    for (o, &vv) in o.iter_mut().zip(&v[s.kv_at(b, j, g)..][..d]) {
                        *o += p / sum * vv;
                    }
                }
                lse[(b * s.heads + h) * s.q_len + i] = max + sum.ln();
            }
        }
    }
}

/// Overwrites `dq`, `dk`, `dv`. With `P = exp(S − lse)`: `dV = Pᵀ·dO`,
/// `dS = P∘(dO·Vᵀ − rowsum(dO∘O))`, `dQ = c·dS·K`, `dK = c·dSᵀ·Q`, each key/value head summing
/// over the query heads of its group.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward_reference<F: Float>(
    s: &CausalAttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
    out: &[F],
    lse: &[F],
    dout: &[F],
    dq: &mut [F],
    dk: &mut [F],
    dv: &mut [F],
) {
    s.check(q, k, v, out, lse);
    s.check(dq, dk, dv, dout, lse);
    let d = s.head_dim;
    let scale: F = s.scale();
    dq.iter_mut()
        .chain(dk.iter_mut())
        .chain(dv.iter_mut())
        .for_each(|x| *x = F::ZERO);
    let mut row = vec![F::ZERO; s.kv_len];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let g = h / s.group();
            for i in 0..s.q_len {
                let l = lse[(b * s.heads + h) * s.q_len + i];
                let row = &mut row[..s.visible(i)];
                scores_row(s, q, k, b, i, h, row);
                let oi = s.q_at(b, i, h);
                let delta = dot(&dout[oi..][..d], &out[oi..][..d]);
                for (j, &sij) in row.iter().enumerate() {
                    let p = (sij - l).exp();
                    let oj = s.kv_at(b, j, g);
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

pub fn causal_attention_forward<F: Float>(
    s: &CausalAttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
    out: &mut [F],
    lse: &mut [F],
) {
    match (as_f32(q), as_f32(k), as_f32(v)) {
        (Some(q), Some(k), Some(v)) => {
            let (out, lse) = (as_f32_mut(out).unwrap(), as_f32_mut(lse).unwrap());
            causal_attention_forward_with_isa(Isa::best(), s, q, k, v, out, lse)
        }
        _ => causal_attention_forward_reference(s, q, k, v, out, lse),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward<F: Float>(
    s: &CausalAttentionShape,
    q: &[F],
    k: &[F],
    v: &[F],
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
        as_f32(out),
        as_f32(lse),
        as_f32(dout),
    ) {
        (Some(q), Some(k), Some(v), Some(out), Some(lse), Some(dout)) => {
            let (dq, dk, dv) = (
                as_f32_mut(dq).unwrap(),
                as_f32_mut(dk).unwrap(),
                as_f32_mut(dv).unwrap(),
            );
            causal_attention_backward_with_isa(Isa::best(), s, q, k, v, out, lse, dout, dq, dk, dv)
        }
        _ => causal_attention_backward_reference(s, q, k, v, out, lse, dout, dq, dk, dv),
    }
}

/// Query rows per block: a task holds the scores of this many rows against the keys they see.
const QUERY_BLOCK: usize = 64;

/// Rows `0..len` of head `head` (of `heads`) of sequence `b` gathered into contiguous
/// `[len, head_dim]` rows, so every product below is a plain GEMM.
fn gather(x: &[f32], len: usize, heads: usize, d: usize, b: usize, head: usize) -> Vec<f32> {
    let width = heads * d;
    let mut rows = Vec::with_capacity(len * d);
    for t in 0..len {
        rows.extend_from_slice(&x[(b * len + t) * width + head * d..][..d]);
    }
    rows
}

/// The inverse of [`gather`] for a head-major `[batch, heads, len, d]` scratch.
fn scatter(scratch: &[f32], len: usize, heads: usize, d: usize, dst: &mut [f32]) {
    let width = heads * d;
    for (bh, head) in scratch.chunks_exact(len * d).enumerate() {
        let (b, h) = (bh / heads, bh % heads);
        for (t, row) in head.chunks_exact(d).enumerate() {
            dst[(b * len + t) * width + h * d..][..d].copy_from_slice(row);
        }
    }
}

fn gemm(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    trans: (bool, bool),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    beta: f32,
) {
    let shape = GemmShape {
        m,
        n,
        k,
        trans_a: trans.0,
        trans_b: trans.1,
    };
    gemm_on_this_thread(isa, shape, a, b, c, beta);
}

/// One (sequence, query head) per task. Per block of query rows: the scores against the keys
/// the block's last row sees (one GEMM), a softmax of each row's visible prefix (the rest set to
/// zero), then `O = P·V` (another GEMM).
pub fn causal_attention_forward_with_isa(
    isa: Isa,
    s: &CausalAttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    s.check(q, k, v, out, lse);
    isa.assert_supported();
    let (q_len, kv_len, d) = (s.q_len, s.kv_len, s.head_dim);
    if q_len == 0 || d == 0 || s.heads == 0 {
        out.fill(0.0);
        return;
    }
    let scale = s.scale::<f32>();
    let no_bias = vec![0.0f32; kv_len];
    let mut heads_out = vec![0.0f32; s.batch * s.heads * q_len * d];
    let items: Vec<_> = heads_out
        .chunks_mut(q_len * d)
        .zip(lse.chunks_mut(q_len))
        .enumerate()
        .collect();
    threads::parallel_each(items, |(bh, (head_out, head_lse))| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let g = h / s.group();
        let q_h = gather(q, q_len, s.heads, d, b, h);
        let k_g = gather(k, kv_len, s.kv_heads, d, b, g);
        let v_g = gather(v, kv_len, s.kv_heads, d, b, g);
        let mut p = vec![0.0f32; QUERY_BLOCK.min(q_len) * kv_len];
        for i0 in (0..q_len).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(q_len - i0);
            let keys = s.visible(i0 + rows - 1);
            let p = &mut p[..rows * keys];
            let q_blk = &q_h[i0 * d..(i0 + rows) * d];
            gemm(
                isa,
                (rows, keys, d),
                (false, true),
                q_blk,
                &k_g[..keys * d],
                p,
                0.0,
            );
            for (r, (row, lse)) in p
                .chunks_exact_mut(keys)
                .zip(&mut head_lse[i0..i0 + rows])
                .enumerate()
            {
                let (seen, hidden) = row.split_at_mut(s.visible(i0 + r));
                let bias = &no_bias[..seen.len()];
                *lse = dispatch!(isa, |simd,
                                       scale: f32,
                                       bias: &[f32],
                                       seen: &mut [f32]|
                 -> f32 {
                    softmax_row(simd, scale, bias, seen)
                });
                hidden.fill(0.0);
            }
            let o = &mut head_out[i0 * d..(i0 + rows) * d];
            gemm(
                isa,
                (rows, d, keys),
                (false, false),
                p,
                &v_g[..keys * d],
                o,
                0.0,
            );
        }
    });
    scatter(&heads_out, q_len, s.heads, d, out);
}

/// One (sequence, key/value head) per task, looping over the query heads of its group so that
/// their contributions to the shared `dK`, `dV` never race. Per block of query rows: `P` from
/// `lse` and `dP = dO·Vᵀ` (two GEMMs), `dS = scale·P∘(dP − δ)` on each row's visible prefix, then
/// `dV += Pᵀ·dO`, `dK += dSᵀ·Q`, `dQ = dS·K`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward_with_isa(
    isa: Isa,
    s: &CausalAttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    s.check(q, k, v, out, lse);
    s.check(dq, dk, dv, dout, lse);
    isa.assert_supported();
    let (q_len, kv_len, d, group) = (s.q_len, s.kv_len, s.head_dim, s.group());
    if q_len == 0 || d == 0 || s.heads == 0 {
        for x in [dq, dk, dv] {
            x.fill(0.0);
        }
        return;
    }
    let scale = s.scale::<f32>();
    let no_bias = vec![0.0f32; kv_len];
    let mut gq = vec![0.0f32; s.batch * s.heads * q_len * d];
    let mut gk = vec![0.0f32; s.batch * s.kv_heads * kv_len * d];
    let mut gv = vec![0.0f32; gk.len()];
    let items: Vec<_> = gq
        .chunks_mut(group * q_len * d)
        .zip(gk.chunks_mut(kv_len * d))
        .zip(gv.chunks_mut(kv_len * d))
        .enumerate()
        .collect();
    threads::parallel_each(items, |(bg, ((dq_group, dk_g), dv_g))| {
        let (b, g) = (bg / s.kv_heads, bg % s.kv_heads);
        let k_g = gather(k, kv_len, s.kv_heads, d, b, g);
        let v_g = gather(v, kv_len, s.kv_heads, d, b, g);
        let block = QUERY_BLOCK.min(q_len) * kv_len;
        let (mut p, mut ds) = (vec![0.0f32; block], vec![0.0f32; block]);
        for (j, dq_h) in dq_group.chunks_mut(q_len * d).enumerate() {
            let h = g * group + j;
            let [q_h, out_h, dout_h] = [q, out, dout].map(|x| gather(x, q_len, s.heads, d, b, h));
            let lse = &lse[(b * s.heads + h) * q_len..][..q_len];
            for i0 in (0..q_len).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(q_len - i0);
                let keys = s.visible(i0 + rows - 1);
                let blk = i0 * d..(i0 + rows) * d;
                let (p, ds) = (&mut p[..rows * keys], &mut ds[..rows * keys]);
                gemm(
                    isa,
                    (rows, keys, d),
                    (false, true),
                    &q_h[blk.clone()],
                    &k_g[..keys * d],
                    p,
                    0.0,
                );
                gemm(
                    isa,
                    (rows, keys, d),
                    (false, true),
                    &dout_h[blk.clone()],
                    &v_g[..keys * d],
                    ds,
                    0.0,
                );
                for (r, (p_row, ds_row)) in p
                    .chunks_exact_mut(keys)
                    .zip(ds.chunks_exact_mut(keys))
                    .enumerate()
                {
                    let i = i0 + r;
                    let seen = s.visible(i);
                    let (dout_i, out_i) = (&dout_h[i * d..(i + 1) * d], &out_h[i * d..(i + 1) * d]);
                    let (p_seen, p_hidden) = p_row.split_at_mut(seen);
                    let (ds_seen, ds_hidden) = ds_row.split_at_mut(seen);
                    let (bias, lse_i) = (&no_bias[..seen], lse[i]);
                    dispatch!(isa, |simd,
                                    scale: f32,
                                    bias: &[f32],
                                    lse_i: f32,
                                    dout_i: &[f32],
                                    out_i: &[f32],
                                    p_seen: &mut [f32],
                                    ds_seen: &mut [f32]|
                     -> () {
                        let delta = dot_simd(simd, dout_i, out_i);
                        score_grads_row(simd, scale, bias, lse_i, delta, p_seen, ds_seen)
                    });
                    p_hidden.fill(0.0);
                    ds_hidden.fill(0.0);
                }
                gemm(
                    isa,
                    (keys, d, rows),
                    (true, false),
                    p,
                    &dout_h[blk.clone()],
                    &mut dv_g[..keys * d],
                    1.0,
                );
                gemm(
                    isa,
                    (keys, d, rows),
                    (true, false),
                    ds,
                    &q_h[blk.clone()],
                    &mut dk_g[..keys * d],
                    1.0,
                );
                gemm(
                    isa,
                    (rows, d, keys),
                    (false, false),
                    ds,
                    &k_g[..keys * d],
                    &mut dq_h[blk],
                    0.0,
                );
            }
        }
    });
    scatter(&gq, q_len, s.heads, d, dq);
    scatter(&gk, kv_len, s.kv_heads, d, dk);
    scatter(&gv, kv_len, s.kv_heads, d, dv);
}
