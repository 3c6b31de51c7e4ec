//! Scaled dot-product attention with a key-padding mask, as one op.
//!
//! Layout: `q`, `k`, `v`, `out` are `[batch, seq, heads·head_dim]` (what the projections produce,
//! so no transpose is needed); `mask` is `[batch, seq]` with 1 for real tokens and 0 for padding.
//! The forward saves one number per query row, `lse = log Σ_j exp(s_ij)` over unmasked keys; the
//! backward recomputes the probabilities from it instead of storing the `seq×seq` matrix
//! (the FlashAttention-2 recipe).

use std::cell::OnceCell;
use std::mem::MaybeUninit;

use crate::cpu::gemm::{gemm_on_this_thread, Activation, GemmShape};
use crate::cpu::gemm_bf16::{
    gemm_bf16_at_b, gemm_bf16_packed, Bf16Input, Bf16Path, PackedBf16Weight,
};
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

/// A `[batch, seq, heads·head_dim]` output that the per-head tasks write at once, each its
/// own head's columns: written in place from the task's scratch while it is in cache, rather
/// than from a zeroed head-major copy of the whole output in a pass of its own (that copy and
/// its zeroing were a fifth of the bf16 attention at 32×128).
#[derive(Clone, Copy)]
struct HeadColumns {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (`write_head` of distinct heads).
unsafe impl Sync for HeadColumns {}

impl HeadColumns {
    fn new(out: &mut [f32]) -> HeadColumns {
        HeadColumns {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// Writes head `h` of batch `b` from `rows` (`[seq, head_dim]`).
    ///
    /// # Safety
    /// No other task may write or read head `(b, h)` of this output during the call.
    unsafe fn write_head(self, s: &AttentionShape, b: usize, h: usize, rows: &[f32]) {
        let d = s.head_dim;
        for (t, row) in rows.chunks_exact(d).enumerate() {
            let at = s.at(b, t, h);
            assert!(at + d <= self.len, "attention: head row outside the output");
            // SAFETY: inside the output (asserted); this head's elements are the caller's.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), self.ptr.add(at), d) };
        }
    }
}

thread_local! {
    /// A task's score rows and head-sized products, reused by every task on this thread.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Lends `f` this thread's scratch, at least `len` floats (their values are left over from an
/// earlier task: every use writes before it reads).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let run = |buf: &mut Vec<f32>| {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => run(&mut buf),
        // Re-entered on this thread (a task's products run inline, so not today).
        Err(_) => run(&mut Vec::new()),
    })
}

/// The additive key mask of batch `b`: 0 for tokens, −∞ for padding.
fn key_bias(s: &AttentionShape, mask: &[f32], b: usize) -> Vec<f32> {
    mask[b * s.seq..(b + 1) * s.seq]
        .iter()
        .map(|&m| if m == 0.0 { f32::NEG_INFINITY } else { 0.0 })
        .collect()
}

/// What attention's products multiply in.
#[derive(Clone, Copy, Debug)]
enum Products {
    /// f32 GEMMs on this ISA.
    F32(Isa),
    /// bf16 GEMMs with f32 accumulation on this path: the left factor rounded at the GEMM's
    /// input, a head's `[seq, d]` operand rounded as it is packed.
    Bf16(Bf16Path),
}

impl Products {
    /// The ISA of the f32 work between the products (softmax, score gradients).
    fn isa(self) -> Isa {
        match self {
            Products::F32(isa) => isa,
            Products::Bf16(_) => Isa::best(),
        }
    }
}

/// Head `h` of batch `b` of a `[batch, seq, heads·d]` operand, gathered into contiguous
/// `[seq, d]` rows so that every product is a plain GEMM, with the bf16 packings of it that the
/// products read made on first use (each once per head, for all its query blocks).
struct HeadOperand {
    rows: Vec<f32>,
    seq: usize,
    d: usize,
    /// The rows as a `[seq, d]` weight: right factor of `a·xᵀ`.
    packed: OnceCell<PackedBf16Weight>,
    /// The rows transposed, a `[d, seq]` weight: right factor of `a·x`.
    packed_transposed: OnceCell<PackedBf16Weight>,
}

impl HeadOperand {
    fn gather(s: &AttentionShape, x: &[f32], b: usize, h: usize) -> HeadOperand {
        let d = s.head_dim;
        let mut rows = Vec::with_capacity(s.seq * d);
        for t in 0..s.seq {
            rows.extend_from_slice(&x[s.at(b, t, h)..][..d]);
        }
        HeadOperand {
            rows,
            seq: s.seq,
            d,
            packed: OnceCell::new(),
            packed_transposed: OnceCell::new(),
        }
    }

    /// Rows `i0..i0 + n`.
    fn block(&self, i0: usize, n: usize) -> &[f32] {
        &self.rows[i0 * self.d..(i0 + n) * self.d]
    }

    /// `out = a·xᵀ` (`[rows, seq]`) for `a` `[rows, d]`: scores against the keys, `dO·Vᵀ`.
    fn times_transposed(&self, products: Products, a: &[f32], out: &mut [f32]) {
        let rows = a.len() / self.d;
        match products {
            Products::F32(isa) => {
                let shape = GemmShape {
                    m: rows,
                    n: self.seq,
                    k: self.d,
                    trans_a: false,
                    trans_b: true,
                };
                gemm_on_this_thread(isa, shape, a, &self.rows, out, 0.0)
            }
            Products::Bf16(path) => {
                let w = self
                    .packed
                    .get_or_init(|| PackedBf16Weight::pack(path, &self.rows, self.seq, self.d));
                gemm_bf16_packed(a, rows, w, None, Activation::Identity, out)
            }
        }
    }

    /// `out = a·x` (`[rows, d]`) for `a` `[rows, seq]`: `P·V`, `dS·K`.
    fn times(&self, products: Products, a: &[f32], out: &mut [f32]) {
        let rows = a.len() / self.seq;
        match products {
            Products::F32(isa) => {
                let shape = GemmShape {
                    m: rows,
                    n: self.d,
                    k: self.seq,
                    trans_a: false,
                    trans_b: false,
                };
                gemm_on_this_thread(isa, shape, a, &self.rows, out, 0.0)
            }
            Products::Bf16(path) => {
                let w = self.packed_transposed.get_or_init(|| {
                    PackedBf16Weight::pack_transposed(path, &self.rows, self.d, self.seq)
                });
                gemm_bf16_packed(a, rows, w, None, Activation::Identity, out)
            }
        }
    }
}

/// A key's gradient from one query block: `out = aᵀ·b` (`[seq, d]`), or `out += aᵀ·b` when
/// `accumulate`, for `a` `[rows, seq]` and `b` `[rows, d]`: `dV += Pᵀ·dO`, `dK += dSᵀ·Q`.
/// `scratch` (`seq·d`) holds a bf16 product before it is added.
fn add_keys_grad(
    products: Products,
    a: &[f32],
    b: &[f32],
    d: usize,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut [MaybeUninit<f32>],
) {
    let (rows, seq) = (b.len() / d, out.len() / d);
    match products {
        Products::F32(isa) => {
            let shape = GemmShape {
                m: seq,
                n: d,
                k: rows,
                trans_a: true,
                trans_b: false,
            };
            let beta = if accumulate { 1.0 } else { 0.0 };
            gemm_on_this_thread(isa, shape, a, b, out, beta)
        }
        Products::Bf16(path) if !accumulate => {
            // SAFETY: `MaybeUninit<f32>` has f32's layout; the GEMM stores only f32s.
            let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
            gemm_bf16_at_b(path, a, Bf16Input::F32(b), seq, d, rows, out, None)
        }
        Products::Bf16(path) => {
            gemm_bf16_at_b(path, a, Bf16Input::F32(b), seq, d, rows, scratch, None);
            for (o, s) in out.iter_mut().zip(scratch.iter()) {
                // SAFETY: the GEMM initialised every element of `scratch`.
                *o += unsafe { s.assume_init() };
            }
        }
    }
}

/// One (batch, head) pair per task. Per block of query rows: the scores against every key (one
/// GEMM), a masked softmax per row that also yields `lse`, then `O = P·V` (another GEMM). The
/// head's output goes into the task's scratch and from there into its columns of `out`.
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
/// softmax and `lse` in f32); [`attention_backward_bf16`] is its backward.
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
    let isa = products.isa();
    let (seq, d) = (s.seq, s.head_dim);
    if seq == 0 || d == 0 || s.heads == 0 {
        lse.fill(f32::NEG_INFINITY);
        out.fill(0.0);
        return;
    }
    let out = HeadColumns::new(out);
    let items: Vec<_> = lse.chunks_mut(seq).enumerate().collect();
    threads::parallel_each(items, |(bh, head_lse)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let [q_h, k_h, v_h] = [q, k, v].map(|x| HeadOperand::gather(s, x, b, h));
        let bias = key_bias(s, mask, b);
        let bias = bias.as_slice();
        let scale = 1.0 / (d as f32).sqrt();
        let block = QUERY_BLOCK.min(seq) * seq;
        with_scratch(block + seq * d, |scratch| {
            let (p, head_out) = scratch.split_at_mut(block);
            for i0 in (0..seq).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(seq - i0);
                let p = &mut p[..rows * seq];
                k_h.times_transposed(products, q_h.block(i0, rows), p);
                for (row, lse) in p.chunks_exact_mut(seq).zip(&mut head_lse[i0..i0 + rows]) {
                    *lse = dispatch!(isa, |simd,
                                           scale: f32,
                                           bias: &[f32],
                                           row: &mut [f32]|
                     -> f32 {
                        softmax_row(simd, scale, bias, row)
                    });
                }
                v_h.times(products, p, &mut head_out[i0 * d..(i0 + rows) * d]);
            }
            // SAFETY: this task alone handles head (b, h).
            unsafe { out.write_head(s, b, h, head_out) };
        });
    });
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
/// `dQ = dS·K`. The head's gradients go into the task's scratch and from there into its
/// columns of `dq`, `dk`, `dv`.
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
    isa.assert_supported();
    backward_with(
        Products::F32(isa),
        s,
        [q, k, v, mask, out, lse, dout],
        [dq, dk, dv],
    )
}

/// The backward of [`attention_forward_bf16`]: every product in bf16 on `path` (f32
/// accumulation), the scores recomputed by the forward's own bf16 product, so that `P` is the
/// one the forward's `lse` normalised; `δ`, `dS` and the sums over query blocks in f32.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_bf16(
    path: Bf16Path,
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
    path.assert_supported();
    backward_with(
        Products::Bf16(path),
        s,
        [q, k, v, mask, out, lse, dout],
        [dq, dk, dv],
    )
}

fn backward_with(
    products: Products,
    s: &AttentionShape,
    [q, k, v, mask, out, lse, dout]: [&[f32]; 7],
    [dq, dk, dv]: [&mut [f32]; 3],
) {
    check_lengths(s, &[q, k, v, out, dout, dq, dk, dv], mask, lse);
    let isa = products.isa();
    let (seq, d) = (s.seq, s.head_dim);
    if seq == 0 || d == 0 || s.heads == 0 {
        return;
    }
    let [dq, dk, dv] = [dq, dk, dv].map(HeadColumns::new);
    threads::parallel_for(s.batch * s.heads, |bh| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let [q_h, k_h, v_h, out_h, dout_h] =
            [q, k, v, out, dout].map(|x| HeadOperand::gather(s, x, b, h));
        let bias = key_bias(s, mask, b);
        let bias = bias.as_slice();
        let lse = &lse[bh * seq..(bh + 1) * seq];
        let scale = 1.0 / (d as f32).sqrt();
        let block = QUERY_BLOCK.min(seq) * seq;
        with_scratch(2 * block + 4 * seq * d, |scratch| {
            let (p, rest) = scratch.split_at_mut(block);
            let (ds, rest) = rest.split_at_mut(block);
            let (dq_h, rest) = rest.split_at_mut(seq * d);
            let (dk_h, rest) = rest.split_at_mut(seq * d);
            let (dv_h, sum) = rest.split_at_mut(seq * d);
            // SAFETY: `MaybeUninit<f32>` has f32's layout; the GEMMs store only f32s into it.
            let sum = unsafe { &mut *(sum as *mut [f32] as *mut [MaybeUninit<f32>]) };
            for i0 in (0..seq).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(seq - i0);
                let (p, ds) = (&mut p[..rows * seq], &mut ds[..rows * seq]);
                let (q_blk, dout_blk) = (q_h.block(i0, rows), dout_h.block(i0, rows));
                k_h.times_transposed(products, q_blk, p);
                v_h.times_transposed(products, dout_blk, ds);
                for (r, (p_row, ds_row)) in p
                    .chunks_exact_mut(seq)
                    .zip(ds.chunks_exact_mut(seq))
                    .enumerate()
                {
                    let i = i0 + r;
                    let (dout_i, out_i) = (dout_h.block(i, 1), out_h.block(i, 1));
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
                let accumulate = i0 > 0;
                add_keys_grad(products, p, dout_blk, d, dv_h, accumulate, sum);
                add_keys_grad(products, ds, q_blk, d, dk_h, accumulate, sum);
                k_h.times(products, ds, &mut dq_h[i0 * d..(i0 + rows) * d]);
            }
            // SAFETY: this task alone handles head (b, h).
            unsafe {
                dq.write_head(s, b, h, dq_h);
                dk.write_head(s, b, h, dk_h);
                dv.write_head(s, b, h, dv_h);
            }
        });
    });
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
