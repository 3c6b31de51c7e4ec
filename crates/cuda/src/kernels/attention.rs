//! `kernels/attention.cu`: fused scaled dot-product attention with a key-padding mask, forward
//! (saving the log-sum-exp) and backward; and their checks.

use scalpel_tensor::cpu::attention::{
    attention_backward_reference, attention_forward_reference, AttentionShape,
};

use super::{div_ceil, expect_len, int};
use crate::check::{check, max_rel_error, narrow, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{CudaError, DeviceBuffer, LaunchConfig, Result, Runtime};

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

/// Lanes per row for `head_dim`, and the launch: one block per (row tile, head, batch). Shared
/// memory per staged row (`AttentionShared`): two tiles of `4·group` float4 chunks, one partial
/// sum per thread, and `stats_per_row` floats (key bias, or lse and delta).
fn attention_launch(s: &AttentionShape, stats_per_row: u32) -> Result<(usize, LaunchConfig)> {
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
            div_ceil(s.seq, rows_per_block),
            u32::try_from(s.heads).map_err(|_| CudaError::Shape("too many heads".into()))?,
            u32::try_from(s.batch).map_err(|_| CudaError::Shape("batch too large".into()))?,
        ],
        block: [ATTENTION_THREADS, 1, 1],
        shared_bytes: ATTENTION_TILE_ROWS
            * (2 * group as u32 * lane_row_bytes + 4 * ATTENTION_THREADS + 4 * stats_per_row),
    };
    Ok((group, config))
}

fn attention_lengths(
    rt: &Runtime,
    s: &AttentionShape,
    tensors: &[(&str, &DeviceBuffer<f32>)],
    mask: &DeviceBuffer<f32>,
    lse: &DeviceBuffer<f32>,
) -> Result<()> {
    for (what, t) in tensors {
        expect_len(rt, what, t, s.batch * s.seq * s.width())?;
    }
    expect_len(rt, "mask", mask, s.batch * s.seq)?;
    expect_len(rt, "lse", lse, s.batch * s.heads * s.seq)?;
    int("batch·seq·width", s.batch * s.seq * s.width())?;
    Ok(())
}

fn softmax_scale(s: &AttentionShape) -> f32 {
    1.0 / (s.head_dim as f32).sqrt()
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
    attention_lengths(
        rt,
        s,
        &[("q", q), ("k", k), ("v", v), ("out", out)],
        mask,
        lse,
    )?;
    if s.batch * s.seq * s.heads == 0 {
        return Ok(());
    }
    let (group, config) = attention_launch(s, 1)?;
    // SAFETY: lengths checked, grid and shared memory from attention_launch.
    unsafe {
        launch::attention_forward_f32(
            rt,
            config,
            s.seq,
            s.heads,
            s.head_dim,
            group,
            softmax_scale(s),
            q.input(),
            k.input(),
            v.input(),
            mask.input(),
            causal as usize,
            out.output(),
            lse.output(),
        )
    }
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
    attention_lengths(
        rt,
        s,
        &[
            ("q", q),
            ("k", k),
            ("v", v),
            ("out", out),
            ("dout", dout),
            ("dq", dq),
            ("dk", dk),
            ("dv", dv),
        ],
        mask,
        lse,
    )?;
    if s.batch * s.seq * s.heads == 0 {
        return Ok(());
    }
    let mut delta = rt.zeros::<f32>(lse.len())?;
    let scale = softmax_scale(s);
    let (group, config) = attention_launch(s, 1)?;
    // SAFETY: lengths checked (delta has lse's), launch from attention_launch.
    unsafe {
        launch::attention_backward_dq_f32(
            rt,
            config,
            s.seq,
            s.heads,
            s.head_dim,
            group,
            scale,
            q.input(),
            k.input(),
            v.input(),
            mask.input(),
            causal as usize,
            out.input(),
            lse.input(),
            dout.input(),
            dq.output(),
            delta.output(),
        )?
    };
    let (group, config) = attention_launch(s, 2)?;
    // SAFETY: as above.
    unsafe {
        launch::attention_backward_dkdv_f32(
            rt,
            config,
            s.seq,
            s.heads,
            s.head_dim,
            group,
            scale,
            q.input(),
            k.input(),
            v.input(),
            mask.input(),
            causal as usize,
            lse.input(),
            delta.input(),
            dout.input(),
            dk.output(),
            dv.output(),
        )
    }
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

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for s in standard_shapes() {
        for causal in [false, true] {
            out.extend(check_attention(rt, s, causal)?);
        }
    }
    Ok(out)
}
