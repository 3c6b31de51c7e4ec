//! The fast `f32` kernels against their scalar references, on every ISA this CPU runs and with
//! one and three threads, at ragged sizes.
//!
//! The oracle is always the `*_reference` function run in `f64` on the same (f32-representable)
//! inputs, so it is independent of the code under test and its own rounding is negligible.
//! Tolerances are forward-error bounds: a sum of `n` products computed in `f32` is off by at most
//! about `n·ε·Σ|terms|` (ε = `f32::EPSILON`), which is what each test allows, with small
//! constants for the handful of extra roundings around the sums.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_tensor::cpu::attention::{self, AttentionShape};
use scalpel_tensor::cpu::gemm::{self, GemmShape};
use scalpel_tensor::cpu::layernorm::{self, LayerNormShape};
use scalpel_tensor::cpu::simd::Isa;
use scalpel_tensor::cpu::{activation, elementwise, pooling, softmax};
use scalpel_tensor::threads;

const EPS: f64 = f32::EPSILON as f64;
const THREAD_COUNTS: [usize; 2] = [1, 3];

/// Every ISA this CPU supports (which always includes `Portable`), each with 1 and 3 threads.
pub(crate) fn for_each_config(mut f: impl FnMut(Isa, &str)) {
    let isas = Isa::available();
    assert_eq!(isas.last(), Some(&Isa::Portable));
    for isa in isas {
        for threads in THREAD_COUNTS {
            let ctx = format!("{isa:?}, {threads} threads");
            threads::with_num_threads(threads, || f(isa, &ctx));
        }
    }
}

pub(crate) fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

pub(crate) fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Asserts `|got[i] − want[i]| ≤ tol(i)` everywhere (NaN fails), naming the first offender.
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f64], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        // NaN fails too: it is neither above nor within the tolerance.
        if err.is_nan() || err > tol(i) {
            panic!(
                "{what}: element {i}: got {g}, want {w}, |diff| {err:e} > tol {:e}",
                tol(i)
            );
        }
    }
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, &v| m.max(v.abs()))
}

// ---------------------------------------------------------------- gemm

/// `C = op(A)·op(B) + beta·C (+ bias)` against the f64 reference, elementwise within
/// `(k + 2)·ε·(|op(A)|·|op(B)|)_ij + 2ε·|beta·C_ij + bias_j|`: the classical bound for a
/// length-`k` dot product, plus the final adds. With beta = 0, C starts as NaN so that
/// "overwrite" is checked too. Odd beta values also add a bias (every ISA's epilogue).
fn check_gemm(rng: &mut StdRng, s: GemmShape, beta: f32) {
    let a = uniform(rng, s.m * s.k, -1.0, 1.0);
    let b = uniform(rng, s.k * s.n, -1.0, 1.0);
    let bias = (beta != 1.0).then(|| uniform(rng, s.n, -1.0, 1.0));
    let c0 = if beta == 0.0 {
        vec![f32::NAN; s.m * s.n]
    } else {
        uniform(rng, s.m * s.n, -1.0, 1.0)
    };
    // The prior part of C: beta·C + bias, to which the product is added.
    let prior: Vec<f64> = (0..s.m * s.n)
        .map(|i| {
            let scaled = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * c0[i] as f64
            };
            scaled + bias.as_ref().map_or(0.0, |bias| bias[i % s.n] as f64)
        })
        .collect();
    let mut want = prior.clone();
    gemm::gemm_reference(s, &widen(&a), &widen(&b), &mut want, 1.0);
    let abs = |x: &[f32]| x.iter().map(|v| v.abs() as f64).collect::<Vec<_>>();
    let mut magnitude = vec![0.0; s.m * s.n];
    gemm::gemm_reference(s, &abs(&a), &abs(&b), &mut magnitude, 0.0);
    let tolerance = |i: usize| (s.k as f64 + 2.0) * EPS * magnitude[i] + 2.0 * EPS * prior[i].abs();
    let bias = bias.as_deref();
    let with_bias = if bias.is_some() { " + bias" } else { "" };
    for_each_config(|isa, ctx| {
        let mut c = c0.clone();
        gemm::gemm_with_isa(isa, s, &a, &b, bias, &mut c, beta);
        assert_close(
            &format!("gemm {s:?} beta {beta}{with_bias} ({ctx})"),
            &c,
            &want,
            tolerance,
        );
        // The same product from B packed in advance (the constant-weight path).
        if !s.trans_a {
            let packed = gemm::PackedB::new(isa, s.k, s.n, s.trans_b, &b);
            let mut c = c0.clone();
            gemm::gemm_prepacked(s, &a, &b, &packed, bias, &mut c, beta);
            let what = format!("gemm_prepacked {s:?} beta {beta}{with_bias} ({ctx})");
            assert_close(&what, &c, &want, tolerance);
            // Into a buffer the caller did not initialise (NaN stands in for garbage), plain and
            // with the GELU epilogue: GELU's slope is below 1.13, and it adds its own few ε.
            if beta == 0.0 {
                let mut want_gelu = want.clone();
                activation::gelu_forward_reference(&mut want_gelu);
                for (act, want, extra) in [
                    (gemm::Activation::Identity, &want, 0.0),
                    (gemm::Activation::Gelu, &want_gelu, 4.0 * EPS),
                ] {
                    let mut c = vec![std::mem::MaybeUninit::new(f32::NAN); s.m * s.n];
                    gemm::gemm_into_uninit(s, &a, &b, Some(&packed), bias, act, &mut c);
                    // SAFETY: gemm_into_uninit initialises every element (they began as NaN).
                    let c: Vec<f32> = c.iter().map(|x| unsafe { x.assume_init() }).collect();
                    let what = format!("gemm_into_uninit {act:?} {s:?}{with_bias} ({ctx})");
                    assert_close(&what, &c, want, |i| {
                        1.13 * tolerance(i)
                            + extra * (prior[i].abs() + magnitude[i] + want[i].abs())
                    });
                }
            }
        }
    });
}

#[test]
fn gemm_matches_reference_at_ragged_sizes() {
    let mut rng = StdRng::seed_from_u64(1);
    let sizes = [1, 7, 33, 65, 257];
    for &m in &sizes {
        for &n in &sizes {
            for &k in &sizes {
                for (trans_a, trans_b) in
                    [(false, false), (false, true), (true, false), (true, true)]
                {
                    for beta in [0.0, 1.0] {
                        check_gemm(
                            &mut rng,
                            GemmShape {
                                m,
                                n,
                                k,
                                trans_a,
                                trans_b,
                            },
                            beta,
                        );
                    }
                }
            }
        }
    }
}

/// Shapes that cross the cache blocks (MC, KC, NC) of every ISA, odd beta, and `k = 0`.
#[test]
fn gemm_matches_reference_across_cache_blocks() {
    let mut rng = StdRng::seed_from_u64(2);
    for (m, n, k) in [
        (400, 70, 300),
        (17, 3100, 9),
        (3, 40, 600),
        (8, 600, 520),
        (5, 9, 0),
    ] {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for beta in [0.0, 0.5] {
                check_gemm(
                    &mut rng,
                    GemmShape {
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                    },
                    beta,
                );
            }
        }
    }
}

#[test]
fn gemm_batched_matches_reference() {
    let mut rng = StdRng::seed_from_u64(3);
    for (batch, m, n, k) in [(5, 7, 33, 20), (3, 65, 70, 80), (2, 1, 1, 1)] {
        for (trans_a, trans_b) in [(false, false), (true, true), (false, true)] {
            let s = GemmShape {
                m,
                n,
                k,
                trans_a,
                trans_b,
            };
            let a = uniform(&mut rng, batch * m * k, -1.0, 1.0);
            let b = uniform(&mut rng, batch * k * n, -1.0, 1.0);
            let c0 = uniform(&mut rng, batch * m * n, -1.0, 1.0);
            let mut want = widen(&c0);
            let (a64, b64) = (widen(&a), widen(&b));
            for i in 0..batch {
                let c = &mut want[i * m * n..(i + 1) * m * n];
                gemm::gemm_reference(
                    s,
                    &a64[i * m * k..(i + 1) * m * k],
                    &b64[i * k * n..(i + 1) * k * n],
                    c,
                    1.0,
                );
            }
            for_each_config(|isa, ctx| {
                let mut c = c0.clone();
                gemm::gemm_batched_with_isa(isa, batch, s, &a, &b, &mut c, 1.0);
                // |A|·|B| ≤ k for entries in [−1, 1]; |C0| ≤ 1.
                assert_close(
                    &format!("gemm_batched {batch}×{s:?} ({ctx})"),
                    &c,
                    &want,
                    |_| (k as f64 + 4.0) * EPS * (k as f64 + 1.0),
                );
            });
        }
    }
}

/// The generic entry point routes f32 to the fast path and f64 to the reference.
#[test]
fn gemm_generic_entry_points_agree() {
    let mut rng = StdRng::seed_from_u64(4);
    let s = GemmShape {
        m: 9,
        n: 40,
        k: 70,
        trans_a: false,
        trans_b: true,
    };
    let (a, b) = (
        uniform(&mut rng, s.m * s.k, -1.0, 1.0),
        uniform(&mut rng, s.k * s.n, -1.0, 1.0),
    );
    let mut want = vec![0.0f64; s.m * s.n];
    gemm::gemm(s, &widen(&a), &widen(&b), &mut want, 0.0);
    let mut got = vec![0.0f32; s.m * s.n];
    gemm::gemm(s, &a, &b, &mut got, 0.0);
    assert_close("gemm::<f32>", &got, &want, |_| {
        (s.k as f64 + 2.0) * EPS * s.k as f64
    });
}

// ---------------------------------------------------------------- activation

const ELEMENTWISE_SIZES: [usize; 6] = [1, 7, 33, 257, 4099, 70_001];

/// Inputs over GELU's interesting range, with exact zeros and values far in both tails.
fn gelu_inputs(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut x = uniform(rng, n, -6.0, 6.0);
    for (i, v) in x.iter_mut().enumerate() {
        match i % 97 {
            0 => *v = 0.0,
            1 => *v *= 4.0,
            2 => *v = -v.abs() * 3.0,
            _ => {}
        }
    }
    x
}

/// `y = x·Φ(x)` with `Φ` accurate to a few ε absolute (and relative on the far left tail), so
/// the result is within `4ε·(|x| + |y|)`.
#[test]
fn gelu_forward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(10);
    for n in ELEMENTWISE_SIZES {
        let x = gelu_inputs(&mut rng, n);
        let mut want = widen(&x);
        activation::gelu_forward_reference(&mut want);
        for_each_config(|isa, ctx| {
            let mut y = x.clone();
            activation::gelu_forward_with_isa(isa, &mut y);
            assert_close(&format!("gelu n={n} ({ctx})"), &y, &want, |i| {
                4.0 * EPS * (x[i].abs() as f64 + want[i].abs())
            });
            // Out of place into a fresh buffer: the same bits as in place, every element written.
            let mut fresh = vec![std::mem::MaybeUninit::new(f32::NAN); n];
            activation::gelu_forward_into_with_isa(isa, &x, &mut fresh);
            // SAFETY: every element was initialised (to NaN) before the call.
            let fresh: Vec<f32> = fresh.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_eq!(
                fresh.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "gelu into n={n} ({ctx})"
            );
        });
    }
}

/// `dx = dy·(Φ(x) + x·φ(x))`: each factor within a few ε, so `8ε·|dy|·(1 + |x|)`.
#[test]
fn gelu_backward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    for n in ELEMENTWISE_SIZES {
        let x = gelu_inputs(&mut rng, n);
        let dy = uniform(&mut rng, n, -2.0, 2.0);
        let mut want = vec![0.0; n];
        activation::gelu_backward_reference(&widen(&x), &widen(&dy), &mut want);
        for_each_config(|isa, ctx| {
            let mut dx = vec![std::mem::MaybeUninit::new(f32::NAN); n];
            activation::gelu_backward_with_isa(isa, &x, &dy, &mut dx);
            // SAFETY: every element was written.
            let dx: Vec<f32> = dx.iter().map(|v| unsafe { v.assume_init() }).collect();
            assert_close(&format!("gelu_backward n={n} ({ctx})"), &dx, &want, |i| {
                8.0 * EPS * dy[i].abs() as f64 * (1.0 + x[i].abs() as f64)
            });
        });
    }
}

// ---------------------------------------------------------------- layernorm

const ROW_SIZES: [usize; 4] = [1, 7, 33, 257];
const COL_SIZES: [usize; 5] = [1, 7, 33, 384, 257];

#[test]
fn layernorm_forward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(20);
    for rows in ROW_SIZES {
        for cols in COL_SIZES {
            for eps in [1e-12, 1e-5] {
                let s = LayerNormShape { rows, cols, eps };
                // An offset mean exercises the centring.
                let x = uniform(&mut rng, rows * cols, -2.0, 3.0);
                let gamma = uniform(&mut rng, cols, 0.5, 1.5);
                let beta = uniform(&mut rng, cols, -0.5, 0.5);
                let (mut y64, mut mean64, mut rstd64) =
                    (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
                let (x64, g64, b64) = (widen(&x), widen(&gamma), widen(&beta));
                layernorm::layernorm_forward_reference(
                    &s,
                    &x64,
                    &g64,
                    &b64,
                    &mut y64,
                    &mut mean64,
                    &mut rstd64,
                );
                // Sums of `cols` terms: relative error ≤ (cols + 8)·ε in the statistics, which
                // carries into x̂ (|x̂| ≤ √cols) and through γ, β.
                let bound = (cols as f64 + 8.0) * EPS;
                for_each_config(|isa, ctx| {
                    let (mut y, mut mean, mut rstd) = (
                        vec![f32::NAN; rows * cols],
                        vec![f32::NAN; rows],
                        vec![f32::NAN; rows],
                    );
                    layernorm::layernorm_forward_with_isa(
                        isa, &s, &x, &gamma, &beta, &mut y, &mut mean, &mut rstd,
                    );
                    let what = format!("layernorm {rows}×{cols} eps {eps} ({ctx})");
                    assert_close(&format!("{what} mean"), &mean, &mean64, |_| bound * 3.0);
                    assert_close(&format!("{what} rstd"), &rstd, &rstd64, |r| {
                        bound * rstd64[r]
                    });
                    assert_close(&format!("{what} y"), &y, &y64, |i| {
                        let c = i % cols;
                        bound * (g64[c].abs() * (cols as f64).sqrt() + b64[c].abs() + 1.0)
                    });
                });
            }
        }
    }
}

/// The inference form `x ← LayerNorm(x + r)` in place, against the f64 reference of the add
/// and the normalisation.
#[test]
fn add_layernorm_matches_reference() {
    let mut rng = StdRng::seed_from_u64(22);
    for rows in ROW_SIZES {
        for cols in COL_SIZES {
            let s = LayerNormShape {
                rows,
                cols,
                eps: 1e-12,
            };
            let x = uniform(&mut rng, rows * cols, -2.0, 3.0);
            let residual = uniform(&mut rng, rows * cols, -1.0, 1.0);
            let gamma = uniform(&mut rng, cols, 0.5, 1.5);
            let beta = uniform(&mut rng, cols, -0.5, 0.5);
            let (g64, b64) = (widen(&gamma), widen(&beta));
            let mut want = widen(&x);
            layernorm::add_layernorm_forward_reference(
                &s,
                &mut want,
                &widen(&residual),
                &g64,
                &b64,
            );
            // As for layernorm, plus the rounding of the sum itself.
            let bound = (cols as f64 + 10.0) * EPS;
            for_each_config(|isa, ctx| {
                let mut got = x.clone();
                layernorm::add_layernorm_forward_with_isa(
                    isa, &s, &mut got, &residual, &gamma, &beta,
                );
                assert_close(
                    &format!("add_layernorm {rows}×{cols} ({ctx})"),
                    &got,
                    &want,
                    |i| {
                        let c = i % cols;
                        bound * (g64[c].abs() * (cols as f64).sqrt() + b64[c].abs() + 1.0)
                    },
                );
            });
        }
    }
}

#[test]
fn layernorm_backward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(21);
    for rows in ROW_SIZES {
        for cols in COL_SIZES {
            let s = LayerNormShape {
                rows,
                cols,
                eps: 1e-5,
            };
            let x = uniform(&mut rng, rows * cols, -2.0, 3.0);
            let gamma = uniform(&mut rng, cols, 0.5, 1.5);
            let dy = uniform(&mut rng, rows * cols, -1.0, 1.0);
            let dgamma0 = uniform(&mut rng, cols, -1.0, 1.0);
            let dbeta0 = uniform(&mut rng, cols, -1.0, 1.0);
            // Statistics from the f64 forward, rounded to f32 as the f32 forward would save them.
            let (mut y64, mut mean64, mut rstd64) =
                (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
            layernorm::layernorm_forward_reference(
                &s,
                &widen(&x),
                &widen(&gamma),
                &vec![0.0; cols],
                &mut y64,
                &mut mean64,
                &mut rstd64,
            );
            let mean: Vec<f32> = mean64.iter().map(|&v| v as f32).collect();
            let rstd: Vec<f32> = rstd64.iter().map(|&v| v as f32).collect();
            let (mut dx64, mut dgamma64, mut dbeta64) =
                (vec![0.0; rows * cols], widen(&dgamma0), widen(&dbeta0));
            layernorm::layernorm_backward_reference(
                &s,
                &widen(&x),
                &widen(&gamma),
                &widen(&mean),
                &widen(&rstd),
                &widen(&dy),
                &mut dx64,
                &mut dgamma64,
                &mut dbeta64,
            );
            let max_rstd = rstd.iter().fold(0.0f32, |m, &v| m.max(v)) as f64;
            let xhat_max = max_rstd * 5.0;
            for_each_config(|isa, ctx| {
                let (mut dx, mut dgamma, mut dbeta) =
                    (vec![f32::NAN; rows * cols], dgamma0.clone(), dbeta0.clone());
                layernorm::layernorm_backward_with_isa(
                    isa,
                    &s,
                    &x,
                    &gamma,
                    &mean,
                    &rstd,
                    &dy,
                    &mut dx,
                    &mut dgamma,
                    &mut dbeta,
                );
                let what = format!("layernorm_backward {rows}×{cols} ({ctx})");
                // dx = rstd·(dy·γ − m1 − x̂·m2): the row sums are within (cols + 8)·ε of
                // magnitude |dy·γ|·(1 + |x̂|), then scaled by x̂ and rstd.
                let bound = (cols as f64 + 8.0)
                    * EPS
                    * max_rstd
                    * 1.5
                    * (1.0 + xhat_max)
                    * (1.0 + xhat_max);
                assert_close(&format!("{what} dx"), &dx, &dx64, |_| bound);
                // Sums over rows of |dy·x̂| ≤ x̂_max and |dy| ≤ 1 on top of |dgamma0| ≤ 1.
                let over_rows = (rows as f64 + 8.0) * EPS * (rows as f64 + 1.0);
                assert_close(&format!("{what} dgamma"), &dgamma, &dgamma64, |_| {
                    over_rows * (1.0 + xhat_max)
                });
                assert_close(&format!("{what} dbeta"), &dbeta, &dbeta64, |_| over_rows);
            });
        }
    }
}

// ---------------------------------------------------------------- softmax

#[test]
fn softmax_matches_reference() {
    let mut rng = StdRng::seed_from_u64(30);
    for rows in ROW_SIZES {
        for cols in COL_SIZES {
            let n = rows * cols;
            let x = uniform(&mut rng, n, -10.0, 10.0);
            let mut y64 = vec![0.0; n];
            softmax::softmax_forward_reference(cols, &widen(&x), &mut y64);
            let y32: Vec<f32> = y64.iter().map(|&v| v as f32).collect();
            let dy = uniform(&mut rng, n, -1.0, 1.0);
            let mut dx64 = vec![0.0; n];
            softmax::softmax_backward_reference(cols, &widen(&y32), &widen(&dy), &mut dx64);
            for_each_config(|isa, ctx| {
                let what = format!("softmax {rows}×{cols} ({ctx})");
                let mut y = vec![f32::NAN; n];
                softmax::softmax_forward_with_isa(isa, cols, &x, &mut y);
                // Each exp within a few ulp (its argument x − max carries |x − max|·ε ≤ 20ε),
                // the normalising sum within cols·ε.
                assert_close(&format!("{what} forward"), &y, &y64, |i| {
                    (cols as f64 + 32.0) * EPS * y64[i]
                });
                let mut dx = vec![f32::NAN; n];
                softmax::softmax_backward_with_isa(isa, cols, &y32, &dy, &mut dx);
                // dx = y·(dy − Σ y·dy), with |Σ y·dy| ≤ 1 summed over cols terms.
                assert_close(&format!("{what} backward"), &dx, &dx64, |i| {
                    (cols as f64 + 4.0) * EPS * y32[i] as f64 * 2.0
                });
            });
        }
    }
}

// ---------------------------------------------------------------- attention

/// Padding masks for `batch` sequences: random holes, one sequence with its first key masked,
/// and (with two or more) one sequence entirely padding.
fn attention_mask(rng: &mut StdRng, batch: usize, seq: usize) -> Vec<f32> {
    let mut mask: Vec<f32> = (0..batch * seq)
        .map(|_| if rng.gen_bool(0.8) { 1.0 } else { 0.0 })
        .collect();
    mask[0] = 0.0;
    if batch >= 2 {
        mask[seq..2 * seq].fill(0.0);
    }
    mask
}

#[test]
fn attention_matches_reference() {
    let mut rng = StdRng::seed_from_u64(40);
    for (batch, seq, heads, head_dim) in [
        (1, 1, 1, 1),
        (2, 7, 3, 7),
        (1, 33, 2, 32),
        (3, 70, 2, 17),
        (2, 130, 1, 33),
        (1, 257, 2, 16),
    ] {
        let s = AttentionShape {
            batch,
            seq,
            heads,
            head_dim,
        };
        let n = batch * seq * heads * head_dim;
        let (q, k, v) = (
            uniform(&mut rng, n, -2.0, 2.0),
            uniform(&mut rng, n, -2.0, 2.0),
            uniform(&mut rng, n, -1.0, 1.0),
        );
        let mask = attention_mask(&mut rng, batch, seq);
        let dout = uniform(&mut rng, n, -1.0, 1.0);
        let (q64, k64, v64, m64) = (widen(&q), widen(&k), widen(&v), widen(&mask));
        let mut out64 = vec![0.0; n];
        let mut lse64 = vec![0.0; batch * heads * seq];
        attention::attention_forward_reference(&s, &q64, &k64, &v64, &m64, &mut out64, &mut lse64);
        // The backward is checked on the f32-rounded forward results the f32 path would save.
        let out32: Vec<f32> = out64.iter().map(|&v| v as f32).collect();
        let lse32: Vec<f32> = lse64.iter().map(|&v| v as f32).collect();
        let (mut dq64, mut dk64, mut dv64) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        attention::attention_backward_reference(
            &s,
            &q64,
            &k64,
            &v64,
            &m64,
            &widen(&out32),
            &widen(&lse32),
            &widen(&dout),
            &mut dq64,
            &mut dk64,
            &mut dv64,
        );
        // Scores are dot products of length head_dim (|s| ≤ 4·√head_dim), the softmax sums
        // over seq keys: every quantity is within (seq + head_dim + 32)·ε of its magnitude.
        let bound = (seq as f64 + head_dim as f64 + 32.0) * EPS;
        let score_max = 4.0 * (head_dim as f64).sqrt();
        for_each_config(|isa, ctx| {
            let what = format!("attention {s:?} ({ctx})");
            let (mut out, mut lse) = (vec![f32::NAN; n], vec![f32::NAN; batch * heads * seq]);
            attention::attention_forward_with_isa(isa, &s, &q, &k, &v, &mask, &mut out, &mut lse);
            // |out| ≤ max|v| = 1; an error δ in a score moves the output by at most 2δ.
            assert_close(&format!("{what} out"), &out, &out64, |_| {
                bound * (1.0 + 2.0 * score_max)
            });
            for (i, (&got, &want)) in lse.iter().zip(&lse64).enumerate() {
                if want == f64::NEG_INFINITY {
                    assert_eq!(
                        got,
                        f32::NEG_INFINITY,
                        "{what} lse[{i}] of a fully masked row"
                    );
                } else {
                    assert!(
                        (got as f64 - want).abs() <= bound * (score_max + want.abs()),
                        "{what} lse[{i}]: {got} vs {want}"
                    );
                }
            }
            let (mut dq, mut dk, mut dv) =
                (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
            attention::attention_backward_with_isa(
                isa, &s, &q, &k, &v, &mask, &out32, &lse32, &dout, &mut dq, &mut dk, &mut dv,
            );
            // Gradients sum up to seq terms each bounded by their tensor's largest entry's scale:
            // compare normwise against the largest reference entry.
            for (name, got, want) in [("dq", &dq, &dq64), ("dk", &dk, &dk64), ("dv", &dv, &dv64)] {
                let scale = max_abs(want) + 1.0;
                assert_close(&format!("{what} {name}"), got, want, |_| {
                    bound * scale * (1.0 + 2.0 * score_max)
                });
            }
        });
    }
}

/// Attention with bf16 products (inference's `--dtype bf16`) on every bf16 path this CPU has,
/// against the f64 attention of the unrounded operands, within what bf16 rounding allows:
/// rounding `q` and `k` (unit roundoff u = 2⁻⁹ each) moves a score by at most
/// `scale·Σ|q||k|·2u ≤ 8√d·u` here (|q|, |k| ≤ 2); a score error δ moves `lse` by δ and the
/// output by 2δ·max|v|, and rounding `P` and `v` adds 2u·max|v| (max|v| = 1). The backward,
/// fed the bf16 forward's own output and `lse` as training saves them, is checked against the
/// f64 backward of the bf16-rounded `q`, `k`, `v` and `dout`: what remains is the rounding of
/// `P` and `dS` for their products and of the output inside `δ` (u relative each), summed over
/// terms of the gradients' own magnitude, so normwise within 4u of the largest gradient entry
/// (+1), as the f32 backward is checked (measured: at most 1.0u on every path here).
#[test]
fn bf16_attention_matches_reference_within_bf16_rounding() {
    use scalpel_tensor::cpu::gemm_bf16::Bf16Path;
    let mut rng = StdRng::seed_from_u64(41);
    let u = 2f64.powi(-9);
    for (batch, seq, heads, head_dim) in [
        (2, 7, 3, 7),
        (1, 33, 2, 32),
        (3, 70, 2, 17),
        (2, 130, 1, 33),
    ] {
        let s = AttentionShape {
            batch,
            seq,
            heads,
            head_dim,
        };
        let n = batch * seq * heads * head_dim;
        let (q, k, v) = (
            uniform(&mut rng, n, -2.0, 2.0),
            uniform(&mut rng, n, -2.0, 2.0),
            uniform(&mut rng, n, -1.0, 1.0),
        );
        let mask = attention_mask(&mut rng, batch, seq);
        let dout = uniform(&mut rng, n, -1.0, 1.0);
        let (q64, k64, v64, m64) = (widen(&q), widen(&k), widen(&v), widen(&mask));
        let mut out64 = vec![0.0; n];
        let mut lse64 = vec![0.0; batch * heads * seq];
        attention::attention_forward_reference(&s, &q64, &k64, &v64, &m64, &mut out64, &mut lse64);
        // The backward's reference: f64 attention of the bf16-rounded operands.
        let rounded = |x: &[f32]| -> Vec<f64> {
            x.iter()
                .map(|&v| half::bf16::from_f32(v).to_f64())
                .collect()
        };
        let (qr, kr, vr) = (rounded(&q), rounded(&k), rounded(&v));
        let (mut out_r, mut lse_r) = (vec![0.0; n], vec![0.0; batch * heads * seq]);
        attention::attention_forward_reference(&s, &qr, &kr, &vr, &m64, &mut out_r, &mut lse_r);
        let (mut dq64, mut dk64, mut dv64) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        attention::attention_backward_reference(
            &s,
            &qr,
            &kr,
            &vr,
            &m64,
            &out_r,
            &lse_r,
            &rounded(&dout),
            &mut dq64,
            &mut dk64,
            &mut dv64,
        );
        let accumulation = (seq as f64 + head_dim as f64 + 32.0) * EPS;
        let score_error = 8.0 * (head_dim as f64).sqrt() * (u + u * u) + accumulation;
        for path in Bf16Path::available() {
            let what = format!("bf16 attention {s:?} on {path:?}");
            let (mut out, mut lse) = (vec![f32::NAN; n], vec![f32::NAN; batch * heads * seq]);
            attention::attention_forward_bf16(path, &s, &q, &k, &v, &mask, &mut out, &mut lse);
            assert_close(&format!("{what} out"), &out, &out64, |_| {
                2.0 * score_error + 2.0 * u + accumulation
            });
            for (i, (&got, &want)) in lse.iter().zip(&lse64).enumerate() {
                if want == f64::NEG_INFINITY {
                    assert_eq!(
                        got,
                        f32::NEG_INFINITY,
                        "{what} lse[{i}] of a fully masked row"
                    );
                } else {
                    let tol = score_error + accumulation * want.abs();
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{what} lse[{i}]: {got} vs {want}"
                    );
                }
            }
            let (mut dq, mut dk, mut dv) =
                (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
            attention::attention_backward_bf16(
                path, &s, &q, &k, &v, &mask, &out, &lse, &dout, &mut dq, &mut dk, &mut dv,
            );
            for (name, got, want) in [("dq", &dq, &dq64), ("dk", &dk, &dk64), ("dv", &dv, &dv64)] {
                let scale = max_abs(want) + 1.0;
                assert_close(&format!("{what} {name}"), got, want, |_| 4.0 * u * scale);
            }
        }
    }
}

// ---------------------------------------------------------------- pooling

#[test]
fn pooling_matches_reference() {
    let mut rng = StdRng::seed_from_u64(50);
    for (batch, seq, dim) in [(1, 1, 1), (2, 7, 33), (3, 33, 384), (2, 257, 7)] {
        let x = uniform(&mut rng, batch * seq * dim, -2.0, 2.0);
        let mut mask = attention_mask(&mut rng, batch, seq);
        if batch >= 3 {
            mask[2 * seq] = 0.5; // a fractional weight is allowed
        }
        let dout = uniform(&mut rng, batch * dim, -1.0, 1.0);
        let (mut pooled64, mut dx64) = (vec![0.0; batch * dim], vec![0.0; batch * seq * dim]);
        pooling::mean_pool_forward_reference(seq, dim, &widen(&x), &widen(&mask), &mut pooled64);
        pooling::mean_pool_backward_reference(seq, dim, &widen(&mask), &widen(&dout), &mut dx64);
        // The second sequence is entirely padding: its norm is clamped, which the tests cover.
        let xn = uniform(&mut rng, batch * dim, -1.0, 1.0);
        let (mut y64, mut norms64) = (vec![0.0; batch * dim], vec![0.0; batch]);
        pooling::l2_normalize_forward_reference(dim, &widen(&xn), &mut y64, &mut norms64);
        let y32: Vec<f32> = y64.iter().map(|&v| v as f32).collect();
        let norms32: Vec<f32> = norms64.iter().map(|&v| v as f32).collect();
        let dy = uniform(&mut rng, batch * dim, -1.0, 1.0);
        let mut dxn64 = vec![0.0; batch * dim];
        pooling::l2_normalize_backward_reference(
            dim,
            &widen(&y32),
            &widen(&norms32),
            &widen(&dy),
            &mut dxn64,
        );
        for_each_config(|isa, ctx| {
            let what = format!("pooling {batch}×{seq}×{dim} ({ctx})");
            let mut pooled = vec![f32::NAN; batch * dim];
            pooling::mean_pool_forward_with_isa(isa, seq, dim, &x, &mask, &mut pooled);
            // A weighted mean of ≤ seq values in [−2, 2].
            assert_close(&format!("{what} mean_pool"), &pooled, &pooled64, |_| {
                (seq as f64 + 4.0) * EPS * 2.0
            });
            let mut dx = vec![f32::NAN; batch * seq * dim];
            pooling::mean_pool_backward_with_isa(isa, seq, dim, &mask, &dout, &mut dx);
            assert_close(&format!("{what} mean_pool_backward"), &dx, &dx64, |i| {
                4.0 * EPS * dx64[i].abs()
            });
            let (mut y, mut norms) = (vec![f32::NAN; batch * dim], vec![f32::NAN; batch]);
            pooling::l2_normalize_forward_with_isa(isa, dim, &xn, &mut y, &mut norms);
            assert_close(&format!("{what} l2 norms"), &norms, &norms64, |r| {
                (dim as f64 + 4.0) * EPS * norms64[r]
            });
            assert_close(&format!("{what} l2 y"), &y, &y64, |i| {
                (dim as f64 + 4.0) * EPS * y64[i].abs().max(1e-3)
            });
            let mut dxn = vec![f32::NAN; batch * dim];
            pooling::l2_normalize_backward_with_isa(isa, dim, &y32, &norms32, &dy, &mut dxn);
            // (dy − y·(y·dy))/‖x‖ with |y·dy| ≤ ‖dy‖ ≤ √dim.
            assert_close(&format!("{what} l2 backward"), &dxn, &dxn64, |i| {
                (dim as f64 + 4.0) * EPS * (1.0 + (dim as f64).sqrt()) / norms32[i / dim] as f64
            });
        });
    }
}

// ---------------------------------------------------------------- elementwise

#[test]
fn elementwise_matches_reference() {
    let mut rng = StdRng::seed_from_u64(60);
    for n in [1, 7, 33, 257, 200_003] {
        let (a, b) = (
            uniform(&mut rng, n, -1.0, 1.0),
            uniform(&mut rng, n, -1.0, 1.0),
        );
        let (mut sum64, mut axpy64, mut scaled64) = (vec![0.0; n], widen(&b), widen(&a));
        elementwise::add_reference(&widen(&a), &widen(&b), &mut sum64);
        elementwise::axpy_reference(-0.75, &widen(&a), &mut axpy64);
        elementwise::scale_reference(1.5, &mut scaled64);
        let squares64 = elementwise::sum_of_squares_reference(&widen(&a));
        let mut squares_first = None;
        for_each_config(|isa, ctx| {
            let what = format!("elementwise n={n} ({ctx})");
            let mut sum = vec![f32::NAN; n];
            elementwise::add_with_isa(isa, &a, &b, &mut sum);
            // One rounding each.
            assert_close(&format!("{what} add"), &sum, &sum64, |i| {
                EPS * sum64[i].abs()
            });
            let mut y = b.clone();
            elementwise::axpy_with_isa(isa, -0.75, &a, &mut y);
            assert_close(&format!("{what} axpy"), &y, &axpy64, |i| {
                2.0 * EPS * (b[i].abs() + a[i].abs()) as f64
            });
            let mut x = a.clone();
            elementwise::scale_with_isa(isa, 1.5, &mut x);
            assert_close(&format!("{what} scale"), &x, &scaled64, |i| {
                EPS * scaled64[i].abs()
            });
            // Exact f64 products summed in another order: n roundings of at most the sum's ulp.
            let squares = elementwise::sum_of_squares(&a);
            let tol = n as f64 * f64::EPSILON * squares64;
            assert!(
                (squares - squares64).abs() <= tol,
                "{what} sum_of_squares: {squares} vs {squares64}"
            );
            // The same bits whatever the thread count.
            assert_eq!(*squares_first.get_or_insert(squares), squares, "{what}");
        });
    }
}

#[test]
fn bias_kernels_match_reference() {
    let mut rng = StdRng::seed_from_u64(61);
    for rows in ROW_SIZES {
        for cols in [1, 7, 33, 257, 1536] {
            let (x, bias) = (
                uniform(&mut rng, rows * cols, -1.0, 1.0),
                uniform(&mut rng, cols, -1.0, 1.0),
            );
            let dbias0 = uniform(&mut rng, cols, -1.0, 1.0);
            let mut biased64 = widen(&x);
            elementwise::add_bias_reference(cols, &widen(&bias), &mut biased64);
            let mut dbias64 = widen(&dbias0);
            elementwise::bias_backward_reference(cols, &widen(&x), &mut dbias64);
            for_each_config(|isa, ctx| {
                let what = format!("bias {rows}×{cols} ({ctx})");
                let mut biased = x.clone();
                elementwise::add_bias_with_isa(isa, cols, &bias, &mut biased);
                assert_close(&format!("{what} add_bias"), &biased, &biased64, |i| {
                    EPS * biased64[i].abs()
                });
                let mut dbias = dbias0.clone();
                elementwise::bias_backward_with_isa(isa, cols, &x, &mut dbias);
                assert_close(&format!("{what} bias_backward"), &dbias, &dbias64, |_| {
                    (rows as f64 + 2.0) * EPS * (rows as f64 + 1.0)
                });
            });
        }
    }
}

// ---------------------------------------------------------------- ISA and threads

#[test]
fn isa_selection_is_consistent() {
    let available = Isa::available();
    assert!(available.contains(&Isa::best()));
    assert!(available.iter().all(|isa| isa.is_supported()));
    assert_eq!(Isa::from_name("AVX512"), Some(Isa::Avx512));
    assert_eq!(Isa::from_name("avx2"), Some(Isa::Avx2Fma));
    assert_eq!(Isa::from_name("portable"), Some(Isa::Portable));
    assert_eq!(Isa::from_name("sse"), None);
}

#[test]
fn parallel_for_runs_every_task_once_and_nests() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    threads::with_num_threads(3, || {
        assert_eq!(threads::num_threads(), 3);
        for n_tasks in [0, 1, 2, 5, 100] {
            let hits: Vec<AtomicUsize> = (0..n_tasks * 7).map(|_| AtomicUsize::new(0)).collect();
            threads::parallel_for(n_tasks, |t| {
                // Nested parallelism runs inline instead of deadlocking.
                threads::parallel_for(7, |u| {
                    hits[t * 7 + u].fetch_add(1, Ordering::Relaxed);
                });
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "{n_tasks} tasks"
            );
        }
    });
}

#[test]
fn parallel_for_propagates_panics_and_recovers() {
    threads::with_num_threads(3, || {
        let result = std::panic::catch_unwind(|| {
            threads::parallel_for(8, |t| {
                if t == 5 {
                    panic!("task 5 failed");
                }
            })
        });
        assert!(result.is_err());
        // The pool still works afterwards.
        let total = std::sync::atomic::AtomicUsize::new(0);
        threads::parallel_for(8, |t| {
            total.fetch_add(t, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(total.into_inner(), 28);
    });
}

#[test]
fn concurrent_parallel_for_callers_each_get_the_pool() {
    // Two callers whose jobs overlap in time: every job must still be spread over the pool (a
    // job of the second caller used to run serially on its own thread while the pool was busy).
    use std::collections::HashSet;
    use std::sync::{Barrier, Mutex};
    let start = Barrier::new(2);
    let threads_per_job = |caller: usize| {
        threads::with_num_threads(2, || {
            start.wait();
            (0..4)
                .map(|_| {
                    let seen = Mutex::new(HashSet::new());
                    threads::parallel_for(8, |_| {
                        seen.lock().unwrap().insert(std::thread::current().id());
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    });
                    seen.into_inner().unwrap().len()
                })
                .map(|used| (caller, used))
                .collect::<Vec<_>>()
        })
    };
    let jobs: Vec<(usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|c| s.spawn(move || threads_per_job(c)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for (caller, used) in jobs {
        assert_eq!(
            used, 2,
            "a job of caller {caller} ran on {used} thread(s), want the caller and one worker"
        );
    }
}
