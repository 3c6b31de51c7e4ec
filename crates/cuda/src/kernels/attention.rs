//! `kernels/attention.cu`: fused scaled dot-product attention, forward (saving the log-sum-exp)
//! and backward, for the encoder (key-padding mask) and the decoder (causal grouped-query
//! attention, keys longer than queries); and their checks.

use scalpel_tensor::cpu::attention::{
    attention_backward_reference, attention_forward_reference, AttentionShape,
};
use scalpel_tensor::cpu::causal_attention::{
    causal_attention_backward_reference, causal_attention_forward_reference, CausalAttentionShape,
};

use super::{div_ceil, expect_len, int};
use crate::check::{check, max_rel_error, narrow, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{CudaError, DeviceBuffer, DeviceIn, LaunchConfig, Result, Runtime};

launchers!("attention");

/// Threads per block of the attention kernels (`BLOCK_THREADS` in attention.cu).
const ATTENTION_THREADS: u32 = 128;
/// Rows of the streamed operand staged per shared-memory tile (`TILE_ROWS` in attention.cu).
const ATTENTION_TILE_ROWS: u32 = 32;
/// Head dims each lane of a row's lane group owns (`4 * LANE_CHUNKS` in attention.cu).
const ATTENTION_DIMS_PER_LANE: usize = 16;
/// The largest lane group, so head_dim ≤ 64: wider heads would need over 48 KiB of shared
/// memory per block (an opt-in the launch path does not make).
const ATTENTION_MAX_GROUP: usize = 4;

/// One problem as the kernels take it: the encoder's attention (`q_len = kv_len`, `kv_heads =
/// heads`, a key-padding mask) or the decoder's causal grouped-query attention (no mask).
struct Problem<'a> {
    s: CausalAttentionShape,
    mask: Option<&'a DeviceBuffer<f32>>,
    causal: bool,
}

impl Problem<'_> {
    fn mask(&self) -> DeviceIn<'_, f32> {
        match self.mask {
            Some(m) => m.input(),
            None => DeviceIn::null(),
        }
    }

    /// Lanes per row for `head_dim`, and the launch: one block per (tile of `rows`, head of
    /// `heads`, batch entry). Shared memory per staged row (`AttentionShared`): two tiles of
    /// `4·group` float4 chunks, one partial sum per thread, and `stats_per_row` floats (key bias,
    /// or lse and delta).
    fn launch(
        &self,
        rows: usize,
        heads: usize,
        stats_per_row: u32,
    ) -> Result<(usize, LaunchConfig)> {
        let s = &self.s;
        let group = s
            .head_dim
            .div_ceil(ATTENTION_DIMS_PER_LANE)
            .next_power_of_two();
        if group > ATTENTION_MAX_GROUP {
            return Err(CudaError::Shape(format!(
                "attention head_dim {} is over the kernels' {}",
                s.head_dim,
                ATTENTION_DIMS_PER_LANE * ATTENTION_MAX_GROUP
            )));
        }
        let rows_per_block = ATTENTION_THREADS as usize / group;
        let lane_row_bytes = (ATTENTION_DIMS_PER_LANE * 4) as u32;
        let config = LaunchConfig {
            grid: [
                div_ceil(rows, rows_per_block),
                u32::try_from(heads).map_err(|_| CudaError::Shape("too many heads".into()))?,
                u32::try_from(s.batch).map_err(|_| CudaError::Shape("batch too large".into()))?,
            ],
            block: [ATTENTION_THREADS, 1, 1],
            shared_bytes: ATTENTION_TILE_ROWS
                * (2 * group as u32 * lane_row_bytes + 4 * ATTENTION_THREADS + 4 * stats_per_row),
        };
        Ok((group, config))
    }

    /// Checks every buffer's length (`queries`: shaped like q; `keys`: like k), the mask's and
    /// lse's, and the shape itself.
    fn lengths(
        &self,
        rt: &Runtime,
        queries: &[(&str, &DeviceBuffer<f32>)],
        keys: &[(&str, &DeviceBuffer<f32>)],
        lse: &DeviceBuffer<f32>,
    ) -> Result<()> {
        let s = &self.s;
        if s.kv_heads == 0 || !s.heads.is_multiple_of(s.kv_heads) || s.kv_len < s.q_len {
            return Err(CudaError::Shape(format!("attention shape {s:?}")));
        }
        let (q_n, kv_n) = (
            s.batch * s.q_len * s.heads * s.head_dim,
            s.batch * s.kv_len * s.kv_heads * s.head_dim,
        );
        for (what, t) in queries {
            expect_len(rt, what, t, q_n)?;
        }
        for (what, t) in keys {
            expect_len(rt, what, t, kv_n)?;
        }
        if let Some(mask) = self.mask {
            expect_len(rt, "mask", mask, s.batch * s.kv_len)?;
        }
        expect_len(rt, "lse", lse, s.batch * s.heads * s.q_len)?;
        int("batch·q_len·width", q_n)?;
        int("batch·kv_len·kv_width", kv_n)?;
        Ok(())
    }

    fn has_queries(&self) -> bool {
        self.s.batch * self.s.q_len * self.s.heads != 0
    }

    fn has_keys(&self) -> bool {
        self.s.batch * self.s.kv_len * self.s.kv_heads != 0
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        rt: &Runtime,
        q: &DeviceBuffer<f32>,
        k: &DeviceBuffer<f32>,
        v: &DeviceBuffer<f32>,
        out: &mut DeviceBuffer<f32>,
        lse: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        self.lengths(rt, &[("q", q), ("out", out)], &[("k", k), ("v", v)], lse)?;
        if !self.has_queries() {
            return Ok(());
        }
        let s = &self.s;
        let (group, config) = self.launch(s.q_len, s.heads, 1)?;
        // SAFETY: lengths checked, grid and shared memory from Problem::launch.
        unsafe {
            launch::attention_forward_f32(
                rt,
                config,
                s.q_len,
                s.kv_len,
                s.heads,
                s.kv_heads,
                s.head_dim,
                group,
                softmax_scale(s.head_dim),
                q.input(),
                k.input(),
                v.input(),
                self.mask(),
                self.causal as usize,
                out.output(),
                lse.output(),
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        rt: &Runtime,
        (q, k, v): (&DeviceBuffer<f32>, &DeviceBuffer<f32>, &DeviceBuffer<f32>),
        out: &DeviceBuffer<f32>,
        lse: &DeviceBuffer<f32>,
        dout: &DeviceBuffer<f32>,
        dq: &mut DeviceBuffer<f32>,
        dk: &mut DeviceBuffer<f32>,
        dv: &mut DeviceBuffer<f32>,
    ) -> Result<()> {
        let queries = [("q", q), ("out", out), ("dout", dout), ("dq", &*dq)];
        let keys = [("k", k), ("v", v), ("dk", &*dk), ("dv", &*dv)];
        self.lengths(rt, &queries, &keys, lse)?;
        let s = &self.s;
        let mut delta = rt.zeros::<f32>(lse.len())?;
        let scale = softmax_scale(s.head_dim);
        let (group, config) = self.launch(s.q_len, s.heads, 1)?;
        if self.has_queries() {
            // SAFETY: lengths checked (delta has lse's), launch from Problem::launch.
            unsafe {
                launch::attention_backward_dq_f32(
                    rt,
                    config,
                    s.q_len,
                    s.kv_len,
                    s.heads,
                    s.kv_heads,
                    s.head_dim,
                    group,
                    scale,
                    q.input(),
                    k.input(),
                    v.input(),
                    self.mask(),
                    self.causal as usize,
                    out.input(),
                    lse.input(),
                    dout.input(),
                    dq.output(),
                    delta.output(),
                )?
            };
        }
        if !self.has_keys() {
            return Ok(());
        }
        // Without queries every key's gradient is zero, which the kernel writes too.
        let (group, config) = self.launch(s.kv_len, s.kv_heads, 2)?;
        // SAFETY: as above; one block per key tile of each key/value head.
        unsafe {
            launch::attention_backward_dkdv_f32(
                rt,
                config,
                s.q_len,
                s.kv_len,
                s.heads,
                s.kv_heads,
                s.head_dim,
                group,
                scale,
                q.input(),
                k.input(),
                v.input(),
                self.mask(),
                self.causal as usize,
                lse.input(),
                delta.input(),
                dout.input(),
                dk.output(),
                dv.output(),
            )
        }
    }
}

fn softmax_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

/// The encoder's shape as the kernels' general one.
fn encoder_problem<'a>(
    s: &AttentionShape,
    mask: &'a DeviceBuffer<f32>,
    causal: bool,
) -> Problem<'a> {
    Problem {
        s: CausalAttentionShape {
            batch: s.batch,
            q_len: s.seq,
            kv_len: s.seq,
            heads: s.heads,
            kv_heads: s.heads,
            head_dim: s.head_dim,
        },
        mask: Some(mask),
        causal,
    }
}

/// Fused attention forward: `q`, `k`, `v`, `out` are `[batch, seq, heads·head_dim]`, `mask`
/// `[batch, seq]` (1 token, 0 padding); saves `lse` (`[batch, heads, seq]`) for the backward.
/// `causal`: query `i` sees keys `j ≤ i` only (a decoder's mask, on top of the padding mask).
/// Rows whose visible keys are all padding get zero output and `lse = −∞`. `head_dim` ≤ 64.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    rt: &Runtime,
    s: &AttentionShape,
    q: &DeviceBuffer<f32>,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    mask: &DeviceBuffer<f32>,
    causal: bool,
    out: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    encoder_problem(s, mask, causal).forward(rt, q, k, v, out, lse)
}

/// Gradients of [`attention_forward`] from its saved `out` and `lse`; overwrites `dq`, `dk`,
/// `dv`. Deterministic (no atomics): a dQ kernel per query tile, then a dK/dV kernel per key tile.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    rt: &Runtime,
    s: &AttentionShape,
    q: &DeviceBuffer<f32>,
    k: &DeviceBuffer<f32>,
    v: &DeviceBuffer<f32>,
    mask: &DeviceBuffer<f32>,
    causal: bool,
    out: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<f32>,
    dq: &mut DeviceBuffer<f32>,
    dk: &mut DeviceBuffer<f32>,
    dv: &mut DeviceBuffer<f32>,
) -> Result<()> {
    encoder_problem(s, mask, causal).backward(rt, (q, k, v), out, lse, dout, dq, dk, dv)
}

fn decoder_problem(s: &CausalAttentionShape) -> Problem<'static> {
    Problem {
        s: *s,
        mask: None,
        causal: true,
    }
}

/// Causal grouped-query attention (`cpu::causal_attention`): `q`, `out` `[batch, q_len,
/// heads·head_dim]` against `k`, `v` `[batch, kv_len, kv_heads·head_dim]`, the queries being the
/// last `q_len` positions; saves `lse` (`[batch, heads, q_len]`). `head_dim` ≤ 64.
pub fn causal_attention_forward(
    rt: &Runtime,
    s: &CausalAttentionShape,
    (q, k, v): (&DeviceBuffer<f32>, &DeviceBuffer<f32>, &DeviceBuffer<f32>),
    out: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    decoder_problem(s).forward(rt, q, k, v, out, lse)
}

/// Gradients of [`causal_attention_forward`]; overwrites `dq`, `dk`, `dv` (each key/value head's
/// summed over the query heads of its group, in registers).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    rt: &Runtime,
    s: &CausalAttentionShape,
    qkv: (&DeviceBuffer<f32>, &DeviceBuffer<f32>, &DeviceBuffer<f32>),
    out: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
    dout: &DeviceBuffer<f32>,
    dq: &mut DeviceBuffer<f32>,
    dk: &mut DeviceBuffer<f32>,
    dv: &mut DeviceBuffer<f32>,
) -> Result<()> {
    decoder_problem(s).backward(rt, qkv, out, lse, dout, dq, dk, dv)
}

/// [`max_rel_error`] over the finite references; infinite references (`lse = −∞` of fully
/// masked rows) must be matched exactly.
fn max_rel_error_finite(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (finite, infinite): (Vec<_>, Vec<_>) =
        got.iter().zip(want).partition(|(_, w)| w.is_finite());
    if infinite.iter().any(|&(&g, &w)| g as f64 != w) {
        return f64::INFINITY;
    }
    let (got, want): (Vec<f32>, Vec<f64>) = finite.into_iter().unzip();
    max_rel_error(&got, &want)
}

/// Key-padding mask with every case the kernels distinguish: batch entries cycle through no
/// padding, the last third padded, and all padding (fully masked rows: zero output, −∞ lse).
fn attention_mask(batch: usize, seq: usize) -> Vec<f32> {
    (0..batch * seq)
        .map(|i| {
            let (b, t) = (i / seq, i % seq);
            match b % 3 {
                0 => 1.0,
                1 if t < seq - seq / 3 => 1.0,
                _ => 0.0,
            }
        })
        .collect()
}

/// Fused attention forward (out and lse) and backward (dQ; dK and dV) against the f64
/// references, padding-masked and optionally `causal`. The backward runs on the reference's
/// `out` and `lse`, so it is checked on its own.
pub fn check_attention(rt: &Runtime, s: AttentionShape, causal: bool) -> Result<Vec<KernelCheck>> {
    let case = format!(
        "batch={} seq={} heads={} head_dim={}, padded and fully masked rows{}",
        s.batch,
        s.seq,
        s.heads,
        s.head_dim,
        if causal { ", causal" } else { "" }
    );
    let n = s.batch * s.seq * s.width();
    let rows = s.batch * s.heads * s.seq;
    let mut rng = Inputs::new(12);
    let (q, k, v) = (
        rng.uniform(n, -2.0, 2.0),
        rng.uniform(n, -2.0, 2.0),
        rng.uniform(n, -2.0, 2.0),
    );
    let dout = rng.uniform(n, -1.0, 1.0);
    let mask = attention_mask(s.batch, s.seq);
    let (dq_in, dk_in, dv_in, dmask) = (
        rt.upload(&q)?,
        rt.upload(&k)?,
        rt.upload(&v)?,
        rt.upload(&mask)?,
    );

    let (mut out, mut lse) = (
        rt.upload(&vec![f32::NAN; n])?,
        rt.upload(&vec![f32::NAN; rows])?,
    );
    attention_forward(
        rt, &s, &dq_in, &dk_in, &dv_in, &dmask, causal, &mut out, &mut lse,
    )?;
    let reference = Reference {
        s,
        q: wide(&q),
        k: wide(&k),
        v: wide(&v),
        mask: wide(&mask),
        causal,
    };
    let (want_out, want_lse) = reference.forward();
    let forward = worst(&[
        max_rel_error(&out.to_host()?, &want_out),
        max_rel_error_finite(&lse.to_host()?, &want_lse),
    ]);

    let (out32, lse32) = (narrow(&want_out), narrow(&want_lse));
    let (mut dq, mut dk, mut dv) = (
        rt.upload(&vec![f32::NAN; n])?,
        rt.upload(&vec![f32::NAN; n])?,
        rt.upload(&vec![f32::NAN; n])?,
    );
    attention_backward(
        rt,
        &s,
        &dq_in,
        &dk_in,
        &dv_in,
        &dmask,
        causal,
        &rt.upload(&out32)?,
        &rt.upload(&lse32)?,
        &rt.upload(&dout)?,
        &mut dq,
        &mut dk,
        &mut dv,
    )?;
    let (want_dq, want_dk, want_dv) =
        reference.backward(&wide(&out32), &wide(&lse32), &wide(&dout));
    Ok(vec![
        check(
            "attention_forward_f32",
            case.clone(),
            forward,
            F32_TOLERANCE,
        ),
        check(
            "attention_backward_dq_f32",
            case.clone(),
            max_rel_error(&dq.to_host()?, &want_dq),
            F32_TOLERANCE,
        ),
        check(
            "attention_backward_dkdv_f32",
            case,
            worst(&[
                max_rel_error(&dk.to_host()?, &want_dk),
                max_rel_error(&dv.to_host()?, &want_dv),
            ]),
            F32_TOLERANCE,
        ),
    ])
}

/// Causal grouped-query attention (the decoder's: keys longer than queries, no mask) forward
/// and backward against the f64 references of `cpu::causal_attention`; the backward runs on the
/// reference's `out` and `lse`, so it is checked on its own.
pub fn check_causal_attention(rt: &Runtime, s: CausalAttentionShape) -> Result<Vec<KernelCheck>> {
    let case = format!(
        "causal, batch={} q_len={} kv_len={} heads={} kv_heads={} head_dim={}",
        s.batch, s.q_len, s.kv_len, s.heads, s.kv_heads, s.head_dim
    );
    let q_n = s.batch * s.q_len * s.heads * s.head_dim;
    let kv_n = s.batch * s.kv_len * s.kv_heads * s.head_dim;
    let rows = s.batch * s.heads * s.q_len;
    let mut rng = Inputs::new(13);
    let (q, k, v) = (
        rng.uniform(q_n, -2.0, 2.0),
        rng.uniform(kv_n, -2.0, 2.0),
        rng.uniform(kv_n, -2.0, 2.0),
    );
    let dout = rng.uniform(q_n, -1.0, 1.0);
    let (dq_in, dk_in, dv_in) = (rt.upload(&q)?, rt.upload(&k)?, rt.upload(&v)?);
    let (mut out, mut lse) = (
        rt.upload(&vec![f32::NAN; q_n])?,
        rt.upload(&vec![f32::NAN; rows])?,
    );
    causal_attention_forward(rt, &s, (&dq_in, &dk_in, &dv_in), &mut out, &mut lse)?;
    let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
    let (mut want_out, mut want_lse) = (vec![0.0; q_n], vec![0.0; rows]);
    causal_attention_forward_reference(&s, &q64, &k64, &v64, &mut want_out, &mut want_lse);
    let forward = worst(&[
        max_rel_error(&out.to_host()?, &want_out),
        max_rel_error(&lse.to_host()?, &want_lse),
    ]);

    let (out32, lse32) = (narrow(&want_out), narrow(&want_lse));
    let (mut dq, mut dk, mut dv) = (
        rt.upload(&vec![f32::NAN; q_n])?,
        rt.upload(&vec![f32::NAN; kv_n])?,
        rt.upload(&vec![f32::NAN; kv_n])?,
    );
    causal_attention_backward(
        rt,
        &s,
        (&dq_in, &dk_in, &dv_in),
        &rt.upload(&out32)?,
        &rt.upload(&lse32)?,
        &rt.upload(&dout)?,
        &mut dq,
        &mut dk,
        &mut dv,
    )?;
    let (mut want_dq, mut want_dk, mut want_dv) =
        (vec![0.0; q_n], vec![0.0; kv_n], vec![0.0; kv_n]);
    causal_attention_backward_reference(
        &s,
        &q64,
        &k64,
        &v64,
        &wide(&out32),
        &wide(&lse32),
        &wide(&dout),
        &mut want_dq,
        &mut want_dk,
        &mut want_dv,
    );
    Ok(vec![
        check(
            "attention_forward_f32",
            case.clone(),
            forward,
            F32_TOLERANCE,
        ),
        check(
            "attention_backward_dq_f32",
            case.clone(),
            max_rel_error(&dq.to_host()?, &want_dq),
            F32_TOLERANCE,
        ),
        check(
            "attention_backward_dkdv_f32",
            case,
            worst(&[
                max_rel_error(&dk.to_host()?, &want_dk),
                max_rel_error(&dv.to_host()?, &want_dv),
            ]),
            F32_TOLERANCE,
        ),
    ])
}

/// The CPU references of `scalpel_tensor::cpu::attention` on one set of f64 inputs. The CPU op
/// has no causal mode, so a causal reference is built from it: query row `i` of batch entry `b`
/// is row `i` of a batch-1 problem whose key mask is `b`'s padding mask cut to keys `j ≤ i`, and
/// its gradients come from that problem with every other row's `dout` zero (summed over `i` for
/// dK and dV).
struct Reference {
    s: AttentionShape,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    mask: Vec<f64>,
    causal: bool,
}

impl Reference {
    /// One batch entry's slice of a `[batch, seq, width]` tensor.
    fn entry<'a>(&self, x: &'a [f64], b: usize) -> &'a [f64] {
        let len = self.s.seq * self.s.width();
        &x[b * len..][..len]
    }

    /// The batch-1 problems of the causal construction: (entry b, row i, its key mask).
    fn causal_rows(&self) -> impl Iterator<Item = (usize, usize, Vec<f64>)> + '_ {
        let seq = self.s.seq;
        (0..self.s.batch).flat_map(move |b| {
            (0..seq).map(move |i| {
                let mask = (0..seq)
                    .map(|j| if j <= i { self.mask[b * seq + j] } else { 0.0 })
                    .collect();
                (b, i, mask)
            })
        })
    }

    fn one(&self) -> AttentionShape {
        AttentionShape { batch: 1, ..self.s }
    }

    /// `out` and `lse`.
    fn forward(&self) -> (Vec<f64>, Vec<f64>) {
        let s = &self.s;
        let (mut out, mut lse) = (
            vec![0.0; self.q.len()],
            vec![0.0; s.batch * s.heads * s.seq],
        );
        if !self.causal {
            attention_forward_reference(
                s, &self.q, &self.k, &self.v, &self.mask, &mut out, &mut lse,
            );
            return (out, lse);
        }
        let one = self.one();
        let (mut o, mut l) = (vec![0.0; s.seq * s.width()], vec![0.0; s.heads * s.seq]);
        for (b, i, mask) in self.causal_rows() {
            let [q, k, v] = [&self.q[..], &self.k[..], &self.v[..]].map(|x| self.entry(x, b));
            attention_forward_reference(&one, q, k, v, &mask, &mut o, &mut l);
            let row = (b * s.seq + i) * s.width();
            out[row..][..s.width()].copy_from_slice(&o[i * s.width()..][..s.width()]);
            for h in 0..s.heads {
                lse[(b * s.heads + h) * s.seq + i] = l[h * s.seq + i];
            }
        }
        (out, lse)
    }

    /// `dq`, `dk`, `dv` from the saved `out` and `lse`.
    fn backward(&self, out: &[f64], lse: &[f64], dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let s = &self.s;
        let n = self.q.len();
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        if !self.causal {
            attention_backward_reference(
                s, &self.q, &self.k, &self.v, &self.mask, out, lse, dout, &mut dq, &mut dk, &mut dv,
            );
            return (dq, dk, dv);
        }
        let (one, width, len) = (self.one(), s.width(), s.seq * s.width());
        let (mut gq, mut gk, mut gv) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
        for (b, i, mask) in self.causal_rows() {
            let [q, k, v, o] =
                [&self.q[..], &self.k[..], &self.v[..], out].map(|x| self.entry(x, b));
            let l = &lse[b * s.heads * s.seq..][..s.heads * s.seq];
            let mut row_dout = vec![0.0; len];
            row_dout[i * width..][..width]
                .copy_from_slice(&self.entry(dout, b)[i * width..][..width]);
            attention_backward_reference(
                &one, q, k, v, &mask, o, l, &row_dout, &mut gq, &mut gk, &mut gv,
            );
            dq[b * len + i * width..][..width].copy_from_slice(&gq[i * width..][..width]);
            for (sum, g) in dk[b * len..][..len].iter_mut().zip(&gk) {
                *sum += g;
            }
            for (sum, g) in dv[b * len..][..len].iter_mut().zip(&gv) {
                *sum += g;
            }
        }
        (dq, dk, dv)
    }
}

/// The standard attention checks: ragged sequences, head dims needing 2 lanes per row.
fn standard_shapes() -> Vec<AttentionShape> {
    vec![
        AttentionShape {
            batch: 3,
            seq: 37,
            heads: 3,
            head_dim: 32,
        },
        AttentionShape {
            batch: 2,
            seq: 70,
            heads: 3,
            head_dim: 20,
        },
    ]
}

/// The standard causal grouped-query checks: a prompt over a cache (keys longer than queries,
/// ragged, 3 query heads per key/value head), a decoding step (one query), and SmolLM2's
/// head_dim of 64 with keys equal to queries.
fn standard_causal_shapes() -> Vec<CausalAttentionShape> {
    let shape = |batch, q_len, kv_len, heads, kv_heads, head_dim| CausalAttentionShape {
        batch,
        q_len,
        kv_len,
        heads,
        kv_heads,
        head_dim,
    };
    vec![
        shape(2, 37, 45, 6, 2, 20),
        shape(1, 1, 40, 3, 1, 32),
        shape(1, 35, 35, 3, 1, 64),
    ]
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for s in standard_shapes() {
        for causal in [false, true] {
            out.extend(check_attention(rt, s, causal)?);
        }
    }
    for s in standard_causal_shapes() {
        out.extend(check_causal_attention(rt, s)?);
    }
    Ok(out)
}
