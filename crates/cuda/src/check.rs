//! Every kernel against the CPU references of `scalpel-tensor`, on any [`Runtime`].
//!
//! Inputs are random at sizes that are not multiples of any tile or block size; references are
//! computed in f64 from the same f32 inputs. The error measure is normwise:
//! `max |got − want| / max |want|` over each output (elementwise relative error is meaningless
//! where a sum cancels to near zero).

use half::{bf16, f16};
use scalpel_tensor::cpu::attention::{
    attention_backward_reference, attention_forward_reference, AttentionShape,
};
use scalpel_tensor::cpu::gemm::{gemm_reference, GemmShape};
use scalpel_tensor::cpu::layernorm::{
    layernorm_backward_reference, layernorm_forward_reference, LayerNormShape,
};
use scalpel_tensor::cpu::{activation, elementwise, embedding, pooling, softmax};
use serde::Serialize;

use crate::ops::{self, AdamStep, HalfElement, WeightDecay};
use crate::{Result, Runtime};

/// f32 kernels against f64 references.
pub const F32_TOLERANCE: f64 = 1e-5;
/// Tensor-core GEMM with f16/bf16 operands against the f64 reference on the f32 inputs.
pub const HALF_TOLERANCE: f64 = 1e-2;

#[derive(Clone, Debug, Serialize)]
pub struct KernelCheck {
    pub kernel: String,
    /// What was run, e.g. the shape.
    pub case: String,
    pub max_rel_error: f64,
    pub tolerance: f64,
}

impl KernelCheck {
    /// False for NaN errors too.
    pub fn passed(&self) -> bool {
        self.max_rel_error <= self.tolerance
    }
}

fn check(kernel: &str, case: String, max_rel_error: f64, tolerance: f64) -> KernelCheck {
    KernelCheck {
        kernel: kernel.to_string(),
        case,
        max_rel_error,
        tolerance,
    }
}

/// `max |got − want| / max |want|`; NaN if any output is NaN, infinite for a length mismatch.
pub fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .fold(0.0f64, |m, w| m.max(w.abs()))
        .max(f64::MIN_POSITIVE);
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        let e = (g as f64 - w).abs() / scale;
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    })
}

fn worst(errors: &[f64]) -> f64 {
    errors.iter().fold(0.0, |m: f64, &e| {
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    })
}

/// SplitMix64: reproducible inputs without a dependency.
pub struct Inputs(u64);

impl Inputs {
    pub fn new(seed: u64) -> Self {
        Inputs(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` values uniform in `[lo, hi)`.
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32))
            .collect()
    }

    pub fn below(&mut self, n: usize, bound: usize) -> Vec<usize> {
        (0..n)
            .map(|_| (self.next() % bound as u64) as usize)
            .collect()
    }
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn variant(s: GemmShape) -> &'static str {
    match (s.trans_a, s.trans_b) {
        (false, false) => "nn",
        (false, true) => "nt",
        (true, false) => "tn",
        (true, true) => "tt",
    }
}

fn gemm_case(s: GemmShape, beta: f32) -> String {
    format!("m={} n={} k={} beta={beta}", s.m, s.n, s.k)
}

/// Random A, B, C and the f64 reference result.
fn gemm_inputs(s: GemmShape, beta: f32, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f64>) {
    let mut rng = Inputs::new(seed);
    let a = rng.uniform(s.m * s.k, -1.0, 1.0);
    let b = rng.uniform(s.k * s.n, -1.0, 1.0);
    let c = rng.uniform(s.m * s.n, -1.0, 1.0);
    let mut want = wide(&c);
    gemm_reference(s, &wide(&a), &wide(&b), &mut want, beta as f64);
    (a, b, c, want)
}

pub fn gemm_f32(rt: &Runtime, s: GemmShape, beta: f32) -> Result<KernelCheck> {
    let (a, b, c, want) = gemm_inputs(s, beta, 1);
    let (da, db, mut dc) = (rt.upload(&a)?, rt.upload(&b)?, rt.upload(&c)?);
    ops::gemm(rt, s, &da, &db, &mut dc, beta)?;
    let kernel = format!("gemm_f32_{}", variant(s));
    Ok(check(
        &kernel,
        gemm_case(s, beta),
        max_rel_error(&dc.to_host()?, &want),
        F32_TOLERANCE,
    ))
}

pub fn gemm_half<T: HalfElement>(rt: &Runtime, s: GemmShape, beta: f32) -> Result<KernelCheck> {
    let (a, b, c, want) = gemm_inputs(s, beta, 2);
    let (mut ha, mut hb) = (rt.zeros::<T>(a.len())?, rt.zeros::<T>(b.len())?);
    ops::cast(rt, &rt.upload(&a)?, &mut ha)?;
    ops::cast(rt, &rt.upload(&b)?, &mut hb)?;
    let mut dc = rt.upload(&c)?;
    ops::gemm_half(rt, s, &ha, &hb, &mut dc, beta)?;
    let kernel = format!("{}_{}", T::GEMM, variant(s));
    Ok(check(
        &kernel,
        gemm_case(s, beta),
        max_rel_error(&dc.to_host()?, &want),
        HALF_TOLERANCE,
    ))
}

/// The casts must round to nearest even exactly as the `half` crate does (tolerance 0), on
/// large values and on values that are subnormal in f16.
pub fn casts(rt: &Runtime, n: usize) -> Result<Vec<KernelCheck>> {
    fn one<T: HalfElement + Into<f64>>(
        rt: &Runtime,
        x: &[f32],
        round: impl Fn(f32) -> T,
    ) -> Result<f64> {
        let mut y = rt.zeros::<T>(x.len())?;
        ops::cast(rt, &rt.upload(x)?, &mut y)?;
        let got: Vec<f32> = y.to_host()?.into_iter().map(|v| v.into() as f32).collect();
        let want: Vec<f64> = x.iter().map(|&v| round(v).into()).collect();
        Ok(max_rel_error(&got, &want))
    }
    let mut rng = Inputs::new(3);
    let (large, tiny) = (
        rng.uniform(n, -60000.0, 60000.0),
        rng.uniform(n, -1e-4, 1e-4),
    );
    let case = format!("n={n}, |x| < 60000 and |x| < 1e-4");
    Ok(vec![
        check(
            f16::CAST,
            case.clone(),
            worst(&[
                one(rt, &large, f16::from_f32)?,
                one(rt, &tiny, f16::from_f32)?,
            ]),
            0.0,
        ),
        check(
            bf16::CAST,
            case,
            worst(&[
                one(rt, &large, bf16::from_f32)?,
                one(rt, &tiny, bf16::from_f32)?,
            ]),
            0.0,
        ),
    ])
}

pub fn elementwise(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let n = rows * cols;
    let case = format!("rows={rows} cols={cols}");
    let mut rng = Inputs::new(4);
    let (a, b) = (rng.uniform(n, -2.0, 2.0), rng.uniform(n, -2.0, 2.0));
    let bias = rng.uniform(cols, -1.0, 1.0);
    let (da, db) = (rt.upload(&a)?, rt.upload(&b)?);
    let mut out = Vec::new();

    let mut got = rt.zeros(n)?;
    ops::add(rt, &da, &db, &mut got)?;
    let mut want = vec![0.0; n];
    elementwise::add(&wide(&a), &wide(&b), &mut want);
    out.push(check(
        "add_f32",
        case.clone(),
        max_rel_error(&got.to_host()?, &want),
        F32_TOLERANCE,
    ));

    let mut y = rt.upload(&b)?;
    ops::axpy(rt, 0.7, &da, &mut y)?;
    let mut want = wide(&b);
    elementwise::axpy(0.7f32 as f64, &wide(&a), &mut want);
    out.push(check(
        "axpy_f32",
        case.clone(),
        max_rel_error(&y.to_host()?, &want),
        F32_TOLERANCE,
    ));

    let mut x = rt.upload(&a)?;
    ops::scale(rt, -1.3, &mut x)?;
    let mut want = wide(&a);
    elementwise::scale(-1.3f32 as f64, &mut want);
    out.push(check(
        "scale_f32",
        case.clone(),
        max_rel_error(&x.to_host()?, &want),
        F32_TOLERANCE,
    ));

    let mut x = rt.upload(&a)?;
    ops::add_bias(rt, cols, &rt.upload(&bias)?, &mut x)?;
    let mut want = wide(&a);
    elementwise::add_bias(cols, &wide(&bias), &mut want);
    out.push(check(
        "add_bias_f32",
        case.clone(),
        max_rel_error(&x.to_host()?, &want),
        F32_TOLERANCE,
    ));

    // Accumulates: start from a non-zero gradient.
    let mut dbias = rt.upload(&bias)?;
    ops::bias_backward(rt, cols, &da, &mut dbias)?;
    let mut want = wide(&bias);
    elementwise::bias_backward(cols, &wide(&a), &mut want);
    out.push(check(
        "bias_backward_f32",
        case,
        max_rel_error(&dbias.to_host()?, &want),
        F32_TOLERANCE,
    ));
    Ok(out)
}

pub fn gelu(rt: &Runtime, n: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("n={n}");
    let mut rng = Inputs::new(5);
    let (x, dy) = (rng.uniform(n, -5.0, 5.0), rng.uniform(n, -1.0, 1.0));
    let (dx_in, ddy) = (rt.upload(&x)?, rt.upload(&dy)?);
    let mut y = rt.zeros(n)?;
    ops::gelu_forward(rt, &dx_in, &mut y)?;
    let mut want = wide(&x);
    activation::gelu_forward_reference(&mut want);
    let forward = check(
        "gelu_forward_f32",
        case.clone(),
        max_rel_error(&y.to_host()?, &want),
        F32_TOLERANCE,
    );
    let mut dx = rt.upload(&vec![f32::NAN; n])?;
    ops::gelu_backward(rt, &dx_in, &ddy, &mut dx)?;
    activation::gelu_backward_reference(&wide(&x), &wide(&dy), &mut want);
    let backward = check(
        "gelu_backward_f32",
        case,
        max_rel_error(&dx.to_host()?, &want),
        F32_TOLERANCE,
    );
    Ok(vec![forward, backward])
}

pub fn layernorm(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let s = LayerNormShape {
        rows,
        cols,
        eps: 1e-12,
    };
    let case = format!("rows={rows} cols={cols}");
    let n = rows * cols;
    let mut rng = Inputs::new(6);
    let x: Vec<f32> = rng.uniform(n, -3.0, 3.0).iter().map(|v| v + 0.5).collect();
    let (gamma, beta) = (rng.uniform(cols, 0.5, 1.5), rng.uniform(cols, -0.5, 0.5));
    let dy = rng.uniform(n, -1.0, 1.0);
    let (dgamma0, dbeta0) = (rng.uniform(cols, -1.0, 1.0), rng.uniform(cols, -1.0, 1.0));

    let (dx_in, dgamma_in, dbeta_in) = (rt.upload(&x)?, rt.upload(&gamma)?, rt.upload(&beta)?);
    let (mut y, mut mean, mut rstd) = (rt.zeros(n)?, rt.zeros(rows)?, rt.zeros(rows)?);
    ops::layernorm_forward(
        rt, &s, &dx_in, &dgamma_in, &dbeta_in, &mut y, &mut mean, &mut rstd,
    )?;
    let (mut want_y, mut want_mean, mut want_rstd) =
        (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    let s64 = LayerNormShape {
        rows,
        cols,
        eps: 1e-12f32 as f64,
    };
    layernorm_forward_reference(
        &s64,
        &wide(&x),
        &wide(&gamma),
        &wide(&beta),
        &mut want_y,
        &mut want_mean,
        &mut want_rstd,
    );
    let forward = worst(&[
        max_rel_error(&y.to_host()?, &want_y),
        max_rel_error(&mean.to_host()?, &want_mean),
        max_rel_error(&rstd.to_host()?, &want_rstd),
    ]);

    // The backward takes the reference's saved statistics, so it is checked on its own.
    let (dmean, drstd) = (
        rt.upload(&narrow(&want_mean))?,
        rt.upload(&narrow(&want_rstd))?,
    );
    let (mut dx, mut dgamma, mut dbeta) = (
        rt.upload(&vec![f32::NAN; n])?,
        rt.upload(&dgamma0)?,
        rt.upload(&dbeta0)?,
    );
    ops::layernorm_backward(
        rt,
        &s,
        &dx_in,
        &dgamma_in,
        &dmean,
        &drstd,
        &rt.upload(&dy)?,
        &mut dx,
        &mut dgamma,
        &mut dbeta,
    )?;
    let (mut want_dx, mut want_dgamma, mut want_dbeta) =
        (vec![0.0; n], wide(&dgamma0), wide(&dbeta0));
    layernorm_backward_reference(
        &s64,
        &wide(&x),
        &wide(&gamma),
        &wide(&narrow(&want_mean)),
        &wide(&narrow(&want_rstd)),
        &wide(&dy),
        &mut want_dx,
        &mut want_dgamma,
        &mut want_dbeta,
    );
    let params = worst(&[
        max_rel_error(&dgamma.to_host()?, &want_dgamma),
        max_rel_error(&dbeta.to_host()?, &want_dbeta),
    ]);
    Ok(vec![
        check(
            "layernorm_forward_f32",
            case.clone(),
            forward,
            F32_TOLERANCE,
        ),
        check(
            "layernorm_backward_dx_f32",
            case.clone(),
            max_rel_error(&dx.to_host()?, &want_dx),
            F32_TOLERANCE,
        ),
        check("layernorm_backward_params_f32", case, params, F32_TOLERANCE),
    ])
}

fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

pub fn softmax(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("rows={rows} cols={cols}");
    let n = rows * cols;
    let mut rng = Inputs::new(7);
    let (x, dy) = (rng.uniform(n, -8.0, 8.0), rng.uniform(n, -1.0, 1.0));
    let mut y = rt.zeros(n)?;
    ops::softmax_forward(rt, cols, &rt.upload(&x)?, &mut y)?;
    let mut want_y = vec![0.0; n];
    softmax::softmax_forward_reference(cols, &wide(&x), &mut want_y);
    let forward = check(
        "softmax_forward_f32",
        case.clone(),
        max_rel_error(&y.to_host()?, &want_y),
        F32_TOLERANCE,
    );

    let y32 = narrow(&want_y);
    let mut dx = rt.upload(&vec![f32::NAN; n])?;
    ops::softmax_backward(rt, cols, &rt.upload(&y32)?, &rt.upload(&dy)?, &mut dx)?;
    let mut want_dx = vec![0.0; n];
    softmax::softmax_backward_reference(cols, &wide(&y32), &wide(&dy), &mut want_dx);
    let backward = check(
        "softmax_backward_f32",
        case,
        max_rel_error(&dx.to_host()?, &want_dx),
        F32_TOLERANCE,
    );
    Ok(vec![forward, backward])
}

pub fn cross_entropy(rt: &Runtime, rows: usize, cols: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("rows={rows} cols={cols}");
    let n = rows * cols;
    let mut rng = Inputs::new(8);
    let logits = rng.uniform(n, -6.0, 6.0);
    let targets = rng.below(rows, cols);
    let device_targets = rt.upload(&targets.iter().map(|&t| t as i32).collect::<Vec<_>>())?;
    let mut probs = rt.zeros(n)?;
    let loss =
        ops::cross_entropy_forward(rt, cols, &rt.upload(&logits)?, &device_targets, &mut probs)?;
    let mut want_probs = vec![0.0; n];
    let want_loss = softmax::cross_entropy_forward(cols, &wide(&logits), &targets, &mut want_probs);
    let forward = worst(&[
        max_rel_error(&probs.to_host()?, &want_probs),
        max_rel_error(&[loss], &[want_loss]),
    ]);

    let p32 = narrow(&want_probs);
    let mut dlogits = rt.upload(&vec![f32::NAN; n])?;
    ops::cross_entropy_backward(
        rt,
        cols,
        &rt.upload(&p32)?,
        &device_targets,
        1.7,
        &mut dlogits,
    )?;
    let mut want = vec![0.0; n];
    softmax::cross_entropy_backward(cols, &wide(&p32), &targets, 1.7f32 as f64, &mut want);
    Ok(vec![
        check(
            "cross_entropy_forward_f32",
            case.clone(),
            forward,
            F32_TOLERANCE,
        ),
        check(
            "cross_entropy_backward_f32",
            case,
            max_rel_error(&dlogits.to_host()?, &want),
            F32_TOLERANCE,
        ),
    ])
}

pub fn embedding(rt: &Runtime, vocab: usize, rows: usize, dim: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("vocab={vocab} rows={rows} dim={dim}");
    let mut rng = Inputs::new(9);
    let table = rng.uniform(vocab * dim, -1.0, 1.0);
    // Few distinct ids, so the backward's scatter-add accumulates repeats.
    let ids = rng.below(rows, vocab.min(7));
    let dout = rng.uniform(rows * dim, -1.0, 1.0);
    let dtable0 = rng.uniform(vocab * dim, -1.0, 1.0);
    let device_ids = rt.upload(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>())?;

    let mut out = rt.zeros(rows * dim)?;
    ops::embedding_forward(rt, dim, &rt.upload(&table)?, &device_ids, &mut out)?;
    let mut want = vec![0.0; rows * dim];
    embedding::embedding_forward(dim, &wide(&table), &ids, &mut want);
    let forward = check(
        "embedding_forward_f32",
        case.clone(),
        max_rel_error(&out.to_host()?, &want),
        F32_TOLERANCE,
    );

    let mut dtable = rt.upload(&dtable0)?;
    ops::embedding_backward(rt, dim, &device_ids, &rt.upload(&dout)?, &mut dtable)?;
    let mut want = wide(&dtable0);
    embedding::embedding_backward(dim, &ids, &wide(&dout), &mut want);
    let backward = check(
        "embedding_backward_f32",
        case.clone(),
        max_rel_error(&dtable.to_host()?, &want),
        F32_TOLERANCE,
    );

    let period = dim.max(2) - 1;
    let mut positions = rt.zeros::<i32>(rows * dim)?;
    ops::repeated_range(rt, period, &mut positions)?;
    let mut want = vec![0i32; rows * dim];
    embedding::repeated_range(period, &mut want);
    let as_f32 = |v: &[i32]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let ranges = check(
        "repeated_range_i32",
        format!("{case} period={period}"),
        max_rel_error(
            &as_f32(&positions.to_host()?),
            &want.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        ),
        0.0,
    );
    Ok(vec![forward, backward, ranges])
}

pub fn pooling(rt: &Runtime, batch: usize, seq: usize, dim: usize) -> Result<Vec<KernelCheck>> {
    let case = format!("batch={batch} seq={seq} dim={dim}");
    let mut rng = Inputs::new(10);
    let x = rng.uniform(batch * seq * dim, -2.0, 2.0);
    // Each sentence has its own length; the last is all padding (the count clamps to 1e-9).
    let mask: Vec<f32> = (0..batch * seq)
        .map(|i| {
            let (b, t) = (i / seq, i % seq);
            if b + 1 < batch && t < seq - b % seq {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let dout = rng.uniform(batch * dim, -1.0, 1.0);
    let (dx_in, dmask) = (rt.upload(&x)?, rt.upload(&mask)?);

    let mut pooled = rt.zeros(batch * dim)?;
    ops::mean_pool_forward(rt, seq, dim, &dx_in, &dmask, &mut pooled)?;
    let mut want = vec![0.0; batch * dim];
    pooling::mean_pool_forward(seq, dim, &wide(&x), &wide(&mask), &mut want);
    let pool_forward = check(
        "mean_pool_forward_f32",
        case.clone(),
        max_rel_error(&pooled.to_host()?, &want),
        F32_TOLERANCE,
    );

    let mut dx = rt.upload(&vec![f32::NAN; batch * seq * dim])?;
    ops::mean_pool_backward(rt, seq, dim, &dmask, &rt.upload(&dout)?, &mut dx)?;
    let mut want = vec![0.0; batch * seq * dim];
    pooling::mean_pool_backward(seq, dim, &wide(&mask), &wide(&dout), &mut want);
    let pool_backward = check(
        "mean_pool_backward_f32",
        case.clone(),
        max_rel_error(&dx.to_host()?, &want),
        F32_TOLERANCE,
    );

    // Normalise rows including an all-zero one (the clamped branch).
    let mut rows = rng.uniform(batch * dim, -1.0, 1.0);
    rows[..dim].iter_mut().for_each(|v| *v = 0.0);
    let (mut y, mut norms) = (rt.zeros(batch * dim)?, rt.zeros(batch)?);
    ops::l2_normalize_forward(rt, dim, &rt.upload(&rows)?, &mut y, &mut norms)?;
    let (mut want_y, mut want_norms) = (vec![0.0; batch * dim], vec![0.0; batch]);
    pooling::l2_normalize_forward(dim, &wide(&rows), &mut want_y, &mut want_norms);
    let norm_forward = worst(&[
        max_rel_error(&y.to_host()?, &want_y),
        max_rel_error(&norms.to_host()?, &want_norms),
    ]);

    let (y32, norms32) = (narrow(&want_y), narrow(&want_norms));
    let mut dx = rt.upload(&vec![f32::NAN; batch * dim])?;
    ops::l2_normalize_backward(
        rt,
        dim,
        &rt.upload(&y32)?,
        &rt.upload(&norms32)?,
        &rt.upload(&dout)?,
        &mut dx,
    )?;
    let mut want = vec![0.0; batch * dim];
    pooling::l2_normalize_backward(dim, &wide(&y32), &wide(&norms32), &wide(&dout), &mut want);
    // The clamped row's gradient is dy / 1e-12: compare the ordinary rows on their own scale.
    let norm_backward = worst(&[
        max_rel_error(&dx.to_host()?[dim..], &want[dim..]),
        max_rel_error(&dx.to_host()?[..dim], &want[..dim]),
    ]);
    Ok(vec![
        pool_forward,
        pool_backward,
        check(
            "l2_normalize_forward_f32",
            case.clone(),
            norm_forward,
            F32_TOLERANCE,
        ),
        check(
            "l2_normalize_backward_f32",
            case,
            norm_backward,
            F32_TOLERANCE,
        ),
    ])
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
/// references. The backward runs on the reference's `out` and `lse`, so it is checked on its own.
pub fn attention(rt: &Runtime, s: AttentionShape) -> Result<Vec<KernelCheck>> {
    let case = format!(
        "batch={} seq={} heads={} head_dim={}, padded and fully masked rows",
        s.batch, s.seq, s.heads, s.head_dim
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
    ops::attention_forward(rt, &s, &dq_in, &dk_in, &dv_in, &dmask, &mut out, &mut lse)?;
    let (mut want_out, mut want_lse) = (vec![0.0; n], vec![0.0; rows]);
    attention_forward_reference(
        &s,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        &wide(&mask),
        &mut want_out,
        &mut want_lse,
    );
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
    ops::attention_backward(
        rt,
        &s,
        &dq_in,
        &dk_in,
        &dv_in,
        &dmask,
        &rt.upload(&out32)?,
        &rt.upload(&lse32)?,
        &rt.upload(&dout)?,
        &mut dq,
        &mut dk,
        &mut dv,
    )?;
    let (mut want_dq, mut want_dk, mut want_dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    attention_backward_reference(
        &s,
        &wide(&q),
        &wide(&k),
        &wide(&v),
        &wide(&mask),
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

/// optim.rs's `update` in f64: the scalars as it computes them, the same operation order.
fn adam_reference(c: &AdamStep, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
    let (b1, b2, t) = (c.beta1, c.beta2, c.step as i32);
    let step_size = c.lr / (1.0 - b1.powi(t));
    let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
    let decoupled = c.decay == WeightDecay::Decoupled;
    let l2 = if decoupled { 0.0 } else { c.weight_decay };
    for i in 0..p.len() {
        let gi = g[i] + l2 * p[i];
        if decoupled && c.weight_decay != 0.0 {
            p[i] *= 1.0 - c.lr * c.weight_decay;
        }
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + c.eps);
    }
}

/// Three Adam steps (bias corrections at t = 1, 2, 3) with decoupled decay and with L2 decay.
/// The parameters are compared as the change `p − p₀`, so an error in the update is not hidden
/// by the parameter's own size.
pub fn adam(rt: &Runtime, n: usize) -> Result<Vec<KernelCheck>> {
    let mut rng = Inputs::new(13);
    let p0 = rng.uniform(n, -1.0, 1.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.uniform(n, -0.5, 0.5)).collect();
    let mut errors = Vec::new();
    for decay in [WeightDecay::Decoupled, WeightDecay::L2] {
        let (mut p, mut m, mut v) = (rt.upload(&p0)?, rt.zeros(n)?, rt.zeros(n)?);
        let (mut want_p, mut want_m, mut want_v) = (wide(&p0), vec![0.0; n], vec![0.0; n]);
        for (t, g) in grads.iter().enumerate() {
            let c = AdamStep {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                decay,
                step: t as u32 + 1,
            };
            ops::adam_step(rt, &c, &mut p, &rt.upload(g)?, &mut m, &mut v)?;
            adam_reference(&c, &mut want_p, &wide(g), &mut want_m, &mut want_v);
        }
        let change: Vec<f64> = want_p.iter().zip(&p0).map(|(w, &x)| w - x as f64).collect();
        let got_change: Vec<f32> = p.to_host()?.iter().zip(&p0).map(|(g, x)| g - x).collect();
        errors.push(max_rel_error(&got_change, &change));
        errors.push(max_rel_error(&m.to_host()?, &want_m));
        errors.push(max_rel_error(&v.to_host()?, &want_v));
    }
    Ok(vec![check(
        "adamw_step_f32",
        format!("n={n}, 3 steps, decoupled and L2 decay"),
        worst(&errors),
        F32_TOLERANCE,
    )])
}

/// Both passes of the sum of squares, at each length in `lens`.
pub fn sum_of_squares(rt: &Runtime, lens: &[usize]) -> Result<Vec<KernelCheck>> {
    let mut rng = Inputs::new(14);
    let mut errors = Vec::new();
    for &n in lens {
        let x = rng.uniform(n, -3.0, 3.0);
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        errors.push(max_rel_error(
            &[ops::sum_of_squares(rt, &rt.upload(&x)?)?],
            &[want],
        ));
    }
    let case = format!("n in {lens:?}");
    let error = worst(&errors);
    Ok(vec![
        check(
            "sum_squares_partial_f32",
            case.clone(),
            error,
            F32_TOLERANCE,
        ),
        check("sum_partials_f32", case, error, F32_TOLERANCE),
    ])
}

/// The standard attention checks: ragged sequences, head dims needing 2 lanes per row.
pub fn attention_shapes() -> Vec<AttentionShape> {
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

/// Shapes of the standard GEMM checks: every transpose combination at ragged sizes, with and
/// without accumulation into C.
pub fn gemm_shapes() -> Vec<(GemmShape, f32)> {
    let mut shapes = Vec::new();
    for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
        shapes.push((
            GemmShape {
                m: 70,
                n: 83,
                k: 45,
                trans_a,
                trans_b,
            },
            0.0,
        ));
        shapes.push((
            GemmShape {
                m: 33,
                n: 65,
                k: 17,
                trans_a,
                trans_b,
            },
            0.5,
        ));
    }
    shapes
}

/// Every check at its standard ragged sizes for the kernel files `include` accepts (by file name,
/// e.g. `"gemm.cu"`): what the tests and the `scalpel kernels` report run.
pub fn all(rt: &Runtime, include: &dyn Fn(&str) -> bool) -> Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    if include("gemm.cu") {
        for (s, beta) in gemm_shapes() {
            out.push(gemm_f32(rt, s, beta)?);
            out.push(gemm_half::<f16>(rt, s, beta)?);
            out.push(gemm_half::<bf16>(rt, s, beta)?);
        }
    }
    if include("elementwise.cu") {
        out.extend(casts(rt, 1031)?);
        out.extend(elementwise(rt, 37, 45)?);
    }
    if include("gelu.cu") {
        out.extend(gelu(rt, 1037)?);
    }
    if include("layernorm.cu") {
        out.extend(layernorm(rt, 19, 77)?);
    }
    if include("softmax.cu") {
        out.extend(softmax(rt, 19, 133)?);
        out.extend(cross_entropy(rt, 13, 150)?);
    }
    if include("embedding.cu") {
        out.extend(embedding(rt, 23, 41, 37)?);
    }
    if include("pooling.cu") {
        out.extend(pooling(rt, 5, 11, 45)?);
    }
    if include("attention.cu") {
        for s in attention_shapes() {
            out.extend(attention(rt, s)?);
        }
    }
    if include("adamw.cu") {
        out.extend(adam(rt, 1037)?);
    }
    if include("reduce.cu") {
        out.extend(sum_of_squares(rt, &[1, 257, 5_003])?);
    }
    Ok(out)
}
