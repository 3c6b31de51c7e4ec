//! The bf16 GEMM (`cpu::gemm_bf16`) on every path this CPU has, with one and three threads,
//! against f64 references.
//!
//! The product of two bf16 values is exact in f32 (8 + 8 significant bits), so against the f64
//! product of the bf16-ROUNDED operands the only error is the f32 accumulation: at most about
//! `(k + 2)·ε·Σ|x̃||w̃|` (ε = `f32::EPSILON`), as for the f32 GEMM. Against the unrounded f32
//! operands the rounding of each to bf16 (relative error ≤ u = 2⁻⁸) adds up to
//! `(2u + u²)·Σ|x||w|`. Rounding to bf16 in the references is `half`'s, independent of the
//! kernels' conversion instructions.

use std::mem::MaybeUninit;

use half::bf16;
use rand::rngs::StdRng;
use rand::SeedableRng;
use scalpel_tensor::cpu::gemm::Activation;
use scalpel_tensor::cpu::gemm_bf16::{
    gemm_bf16_at_b, gemm_bf16_into_uninit, gemm_bf16_packed, round_into, Bf16Input, Bf16Output,
    Bf16Path, PackedBf16Weight,
};
use scalpel_tensor::cpu::{activation, elementwise};
use scalpel_tensor::threads;

use crate::kernels::{assert_close, uniform};

const EPS: f64 = f32::EPSILON as f64;
/// Unit roundoff of bf16 (8 significant bits): 2⁻⁸.
const BF16_U: f64 = 1.0 / 256.0;

/// The paths to test: all this CPU runs, after checking that each one CPUID advertises (AMX,
/// AVX512-BF16) is among them, so a missing permission or detection fails instead of passing
/// with fewer paths.
fn paths() -> Vec<Bf16Path> {
    let available = Bf16Path::available();
    for path in Bf16Path::advertised() {
        assert!(
            available.contains(&path),
            "CPUID advertises {path:?}, but it cannot run (available: {available:?})"
        );
    }
    available
}

fn rounded(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| bf16::from_f32(v).to_f64()).collect()
}

/// `Σ_p f(x[i, p], w[j, p])` for every `(i, j)`, in f64.
fn product(x: &[f64], w: &[f64], m: usize, n: usize, k: usize, f: fn(f64, f64) -> f64) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| f(x[i * k + p], w[j * k + p])).sum();
        }
    }
    out
}

/// `Y = act(X·Wᵀ + bias)` at one size, on every path, plain and with bias + GELU, into a
/// NaN-filled output (so every element must be written). Returns the paths it ran.
fn check(rng: &mut StdRng, m: usize, n: usize, k: usize) -> Vec<Bf16Path> {
    let x = uniform(rng, m * k, -1.0, 1.0);
    let w = uniform(rng, n * k, -1.0, 1.0);
    let bias = uniform(rng, n, -1.0, 1.0);
    let (xr, wr) = (rounded(&x), rounded(&w));
    let widen = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
    let (xf, wf) = (widen(&x), widen(&w));
    let on_rounded = product(&xr, &wr, m, n, k, |a, b| a * b);
    let magnitude = product(&xr, &wr, m, n, k, |a, b| (a * b).abs());
    let on_unrounded = product(&xf, &wf, m, n, k, |a, b| a * b);
    let magnitude_unrounded = product(&xf, &wf, m, n, k, |a, b| (a * b).abs());
    let accumulation =
        |i: usize, prior: f64| (k as f64 + 2.0) * EPS * magnitude[i] + 2.0 * EPS * prior.abs();
    let paths = paths();
    for &path in &paths {
        let packed = PackedBf16Weight::pack(path, &w, n, k);
        assert_eq!(packed.path(), path);
        for threads in [1, 3] {
            let ctx = format!("{m}×{n}×{k}, {path:?}, {threads} threads");
            threads::with_num_threads(threads, || {
                // Plain: against the rounded operands, then the unrounded ones.
                let mut y = vec![f32::NAN; m * n];
                gemm_bf16_packed(&x, m, &packed, None, Activation::Identity, &mut y);
                assert_close(&format!("bf16 gemm {ctx}"), &y, &on_rounded, |i| {
                    accumulation(i, 0.0)
                });
                assert_close(
                    &format!("bf16 gemm vs f32 operands {ctx}"),
                    &y,
                    &on_unrounded,
                    |i| {
                        (2.0 * BF16_U + BF16_U * BF16_U) * magnitude_unrounded[i]
                            + accumulation(i, 0.0)
                    },
                );
                // Bias alone (AMX starts its accumulators from it and stores full tiles straight
                // into C), into a NaN-filled buffer.
                let mut want: Vec<f64> = (0..m * n)
                    .map(|i| on_rounded[i] + bias[i % n] as f64)
                    .collect();
                let mut y = vec![f32::NAN; m * n];
                gemm_bf16_packed(&x, m, &packed, Some(&bias), Activation::Identity, &mut y);
                assert_close(&format!("bf16 gemm + bias {ctx}"), &y, &want, |i| {
                    accumulation(i, bias[i % n] as f64)
                });
                // Bias and GELU in the epilogue, into an uninitialised (NaN) buffer. GELU's slope
                // is below 1.13 and it adds a few ε of its own.
                let before_gelu = want.clone();
                activation::gelu_forward_reference(&mut want);
                let mut y = vec![MaybeUninit::new(f32::NAN); m * n];
                let (input, act) = (Bf16Input::F32(&x), Activation::Gelu);
                gemm_bf16_into_uninit(input, m, &packed, Some(&bias), act, Bf16Output::F32(&mut y));
                // SAFETY: gemm_bf16_into_uninit initialises every element (they began as NaN).
                let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert_close(&format!("bf16 gemm + bias + GELU {ctx}"), &y, &want, |i| {
                    let prior = bias[i % n] as f64;
                    1.13 * accumulation(i, prior)
                        + 4.0 * EPS * (prior.abs() + magnitude[i] + before_gelu[i].abs())
                });
            });
        }
    }
    paths
}

#[test]
fn bf16_gemm_matches_f64_reference_at_ragged_sizes_on_every_path() {
    let mut rng = StdRng::seed_from_u64(17);
    let mut ran = Vec::new();
    // Sizes off every tile and block: 1, 3, 17, 33, 100, 257 against the 14- and 32-row tiles,
    // 32-column panels, 32-deep AMX tile rows; exact tiles (16, 32, 64) and one size past the
    // cache blocks (336 rows and 1024 depth of AVX512-BF16, 256 columns and 256 depth of AMX,
    // ragged and exact).
    for (m, n, k) in [
        (1, 1, 1),
        (1, 3, 17),
        (3, 17, 33),
        (17, 33, 3),
        (33, 100, 257),
        (100, 257, 100),
        (257, 33, 17),
        (16, 32, 32),
        (32, 64, 64),
        (15, 31, 63),
        (350, 300, 1100),
        (64, 512, 512),
    ] {
        ran = check(&mut rng, m, n, k);
    }
    eprintln!("bf16 gemm paths run: {ran:?}");
    assert_eq!(
        ran,
        Bf16Path::advertised(),
        "the paths run should be all CPUID advertises"
    );
}

/// `half`'s rounding to bf16 (to nearest even), with a subnormal flushed to zero of its sign.
fn flushed_bf16(v: f32) -> u16 {
    match v.is_subnormal() {
        true => bf16::from_f32(v.signum() * 0.0).to_bits(),
        false => bf16::from_f32(v).to_bits(),
    }
}

/// `X` given in bf16 (rounded already) gives the bits `X` in f32 gives, and a bf16 output holds
/// the f32 output rounded (to nearest even, a subnormal to zero), bit for bit: on every path, 1 and 3
/// threads, without and with bias and GELU. The sizes cover AMX reading bf16 rows in place
/// (depth a multiple of 32) with a ragged tail of rows copied into tiles, one depth block and
/// several, and depths it must copy whole; AVX512-BF16 rounding as it stores (one depth block:
/// whole 14×32 tiles and edges) and, past 1,024 deep, after.
#[test]
fn bf16_gemm_bf16_input_and_output_have_the_bits_of_the_f32_ones() {
    let mut rng = StdRng::seed_from_u64(19);
    for (m, n, k) in [
        (70, 100, 384),
        (30, 70, 1100),
        (45, 40, 800),
        (32, 64, 64),
        (33, 17, 100),
        (5, 3, 32),
    ] {
        let x = uniform(&mut rng, m * k, -1.0, 1.0);
        let x_bf16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let w = uniform(&mut rng, n * k, -1.0, 1.0);
        let bias = uniform(&mut rng, n, -1.0, 1.0);
        for path in paths() {
            let packed = PackedBf16Weight::pack(path, &w, n, k);
            for threads in [1, 3] {
                for (bias, act) in [
                    (None, Activation::Identity),
                    (Some(&bias[..]), Activation::Identity),
                    (Some(&bias[..]), Activation::Gelu),
                ] {
                    let ctx = format!("{m}×{n}×{k}, {path:?}, {threads} threads, {bias:?} {act:?}");
                    let run_f32 = |input: Bf16Input<'_>| {
                        let mut y = vec![MaybeUninit::new(f32::NAN); m * n];
                        gemm_bf16_into_uninit(
                            input,
                            m,
                            &packed,
                            bias,
                            act,
                            Bf16Output::F32(&mut y),
                        );
                        // SAFETY: every element was written (they began as NaN).
                        y.iter()
                            .map(|v| unsafe { v.assume_init() }.to_bits())
                            .collect::<Vec<_>>()
                    };
                    let run_bf16 = |input: Bf16Input<'_>| {
                        let mut y = vec![MaybeUninit::new(bf16::NAN); m * n];
                        gemm_bf16_into_uninit(
                            input,
                            m,
                            &packed,
                            bias,
                            act,
                            Bf16Output::Bf16(&mut y),
                        );
                        // SAFETY: every element was written (they began as NaN).
                        y.iter()
                            .map(|v| unsafe { v.assume_init() }.to_bits())
                            .collect::<Vec<_>>()
                    };
                    threads::with_num_threads(threads, || {
                        let y = run_f32(Bf16Input::F32(&x));
                        let want_bf16: Vec<u16> =
                            y.iter().map(|&b| flushed_bf16(f32::from_bits(b))).collect();
                        same_bits(
                            &run_f32(Bf16Input::Bf16(&x_bf16)),
                            &y,
                            &format!("bf16 input, {ctx}"),
                        );
                        same_bits(
                            &run_bf16(Bf16Input::F32(&x)),
                            &want_bf16,
                            &format!("bf16 output, {ctx}"),
                        );
                        same_bits(
                            &run_bf16(Bf16Input::Bf16(&x_bf16)),
                            &want_bf16,
                            &format!("bf16 input and output, {ctx}"),
                        );
                    });
                }
            }
        }
    }
}

/// Fails naming the first element whose bits differ, and how many do.
fn same_bits<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: lengths");
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{ctx}: {} of {} elements differ, the first at {i}: {:?} against {:?}",
            differ.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// The rounding to bf16 against `half`'s with subnormals flushed, bit for bit, on normal
/// values, exact ties (the low 16 bits 0x8000, which go to the even neighbour), tiny normals,
/// subnormals, zeros and infinities, at lengths off its 32-value steps and its chunks.
#[test]
fn round_into_rounds_to_nearest_even_as_half_does() {
    let mut rng = StdRng::seed_from_u64(20);
    for len in [1, 31, 33, 16_385] {
        let mut src = uniform(&mut rng, len, -1e4, 1e4);
        for (i, v) in src.iter_mut().enumerate() {
            match i % 5 {
                1 => *v = f32::from_bits((v.to_bits() & !0xffff) | 0x8000),
                2 => *v *= 1e-30,
                3 => *v = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY][i / 5 % 4],
                4 => *v *= 1e-42,
                _ => {}
            }
        }
        let mut got = vec![MaybeUninit::new(bf16::NAN); len];
        round_into(&src, &mut got);
        for (i, (&s, g)) in src.iter().zip(&got).enumerate() {
            // SAFETY: every element was written.
            let g = unsafe { g.assume_init() };
            assert_eq!(g.to_bits(), flushed_bf16(s), "element {i} of {len}: {s:e}");
        }
    }
}

/// GELU stored in bf16 (bf16 training's FFN output) has the bits of the f32 GELU rounded by
/// `round_into`, at lengths off its vector steps, its 1024-value blocks and its tasks, with
/// inputs whose GELU is tiny (subnormal in f32, flushed to zero) or large.
#[test]
fn gelu_to_bf16_has_the_bits_of_the_f32_gelu_rounded() {
    let mut rng = StdRng::seed_from_u64(21);
    for len in [1, 17, 1023, 1025, 40_001] {
        let mut x = uniform(&mut rng, len, -6.0, 6.0);
        for (i, v) in x.iter_mut().enumerate() {
            match i % 7 {
                1 => *v = -13.0 - v.abs(),
                2 => *v *= 100.0,
                _ => {}
            }
        }
        let mut f32_gelu = vec![MaybeUninit::new(f32::NAN); len];
        activation::gelu_forward_into(&x, &mut f32_gelu);
        // SAFETY: every element was written.
        let f32_gelu: Vec<f32> = f32_gelu
            .iter()
            .map(|v| unsafe { v.assume_init() })
            .collect();
        let mut want = vec![MaybeUninit::new(bf16::NAN); len];
        round_into(&f32_gelu, &mut want);
        let mut got = vec![MaybeUninit::new(bf16::NAN); len];
        activation::gelu_forward_into_bf16(&x, &mut got);
        for i in 0..len {
            // SAFETY: every element was written.
            let (g, w) = unsafe { (got[i].assume_init(), want[i].assume_init()) };
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "element {i} of {len}: gelu({:e})",
                x[i]
            );
        }
    }
}

/// With `X = I` (k×k) the output is `Wᵀ` rounded to bf16, exactly: each element is a single
/// product by 1. A depth step read from the wrong half of a pair, or a depth remainder past a
/// tile row, puts a different weight (or zero) there. Also checks that a weight given in bf16
/// packs as is, and one given transposed (`[k, n]`, `pack_transposed`) as its transpose.
#[test]
fn bf16_gemm_reads_every_depth_step_from_its_own_weight() {
    let mut rng = StdRng::seed_from_u64(18);
    let (n, k) = (45, 67);
    let w = uniform(&mut rng, n * k, -1.0, 1.0);
    let w_bf16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let identity: Vec<f32> = (0..k * k)
        .map(|i| if i / k == i % k { 1.0 } else { 0.0 })
        .collect();
    for path in paths() {
        let w_t: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
        for packed in [
            PackedBf16Weight::pack(path, &w, n, k),
            PackedBf16Weight::pack(path, &w_bf16, n, k),
            PackedBf16Weight::pack_transposed(path, &w_t, n, k),
        ] {
            let mut y = vec![f32::NAN; k * n];
            gemm_bf16_packed(&identity, k, &packed, None, Activation::Identity, &mut y);
            for p in 0..k {
                for j in 0..n {
                    let want = w_bf16[j * k + p].to_f32();
                    assert_eq!(
                        y[p * n + j],
                        want,
                        "{path:?}: Y[{p}, {j}] should be W[{j}, {p}]"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_gemm_with_no_depth_stores_the_bias() {
    for path in paths() {
        let packed = PackedBf16Weight::pack(path, &[0.0f32; 0], 5, 0);
        let bias = [1.0, -2.0, 3.0, 0.5, 0.0];
        let mut y = vec![f32::NAN; 2 * 5];
        gemm_bf16_packed(&[], 2, &packed, Some(&bias), Activation::Identity, &mut y);
        assert_eq!(y, [bias, bias].concat(), "{path:?}");
    }
}

/// `C = Aᵀ·B` (a weight gradient `dYᵀ·X`: `A` `[k, m]`, `B` `[k, n]`) on every bf16 path this
/// CPU has, into a NaN-filled output, against the f64 product of the bf16-rounded operands:
/// only the f32 accumulation may differ. Ragged sizes off the 14-row and 32-row tiles, the
/// 16-word interleave and 16×16 transpose, the 32-column panels and the 32-deep padding, past
/// the 256- and 1024-deep blocks; 1 and 3 threads. The column sums of the unrounded `A` that
/// come with it (a bias gradient) against the f64 sums, within `k·ε` of the sum of magnitudes.
#[test]
fn bf16_gemm_at_b_matches_f64_reference_of_rounded_operands() {
    let mut rng = StdRng::seed_from_u64(19);
    for (m, n, k) in [
        (1, 1, 1),
        (19, 37, 9),
        (33, 17, 64),
        (15, 100, 33),
        (384, 40, 1100),
        (50, 300, 520),
    ] {
        let a = uniform(&mut rng, k * m, -1.0, 1.0);
        let b = uniform(&mut rng, k * n, -1.0, 1.0);
        let (ar, br) = (rounded(&a), rounded(&b));
        let b_rounded: Vec<bf16> = b
            .iter()
            .map(|&v| bf16::from_bits(flushed_bf16(v)))
            .collect();
        let mut want = vec![0.0; m * n];
        let mut magnitude = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let t = ar[p * m + i] * br[p * n + j];
                    want[i * n + j] += t;
                    magnitude[i * n + j] += t.abs();
                }
            }
        }
        let a_ref = &a;
        let column = |i: usize| (0..k).map(move |p| a_ref[p * m + i] as f64);
        let want_sums: Vec<f64> = (0..m).map(|i| column(i).sum()).collect();
        let sum_magnitude: Vec<f64> = (0..m).map(|i| column(i).map(f64::abs).sum()).collect();
        for (path, threads) in Bf16Path::available()
            .into_iter()
            .flat_map(|p| [(p, 1), (p, 3)])
        {
            threads::with_num_threads(threads, || {
                let mut y = vec![MaybeUninit::new(f32::NAN); m * n];
                let mut sums = vec![f32::NAN; m];
                gemm_bf16_at_b(
                    path,
                    &a,
                    Bf16Input::F32(&b),
                    m,
                    n,
                    k,
                    &mut y,
                    Some(&mut sums),
                );
                // SAFETY: gemm_bf16_at_b initialises every element (they began as NaN).
                let y: Vec<f32> = y.iter().map(|v| unsafe { v.assume_init() }).collect();
                // `B` rounded beforehand (an input rounded once for several GEMMs) gives the
                // same bits.
                let mut y_from_bf16 = vec![MaybeUninit::new(f32::NAN); m * n];
                let b_bf16 = Bf16Input::Bf16(&b_rounded);
                gemm_bf16_at_b(path, &a, b_bf16, m, n, k, &mut y_from_bf16, None);
                // SAFETY: as above.
                let y_from_bf16: Vec<f32> = y_from_bf16
                    .iter()
                    .map(|v| unsafe { v.assume_init() })
                    .collect();
                let ctx = format!("{m}×{n}×{k}, {path:?}, {threads} threads");
                assert_close(&format!("bf16 Aᵀ·B {ctx}"), &y, &want, |i| {
                    (k as f64 + 2.0) * EPS * magnitude[i]
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&y_from_bf16),
                    bits(&y),
                    "bf16 Aᵀ·B {ctx}: a bf16 B against its f32 source"
                );
                assert_close(&format!("column sums of A {ctx}"), &sums, &want_sums, |i| {
                    k as f64 * EPS * sum_magnitude[i]
                });
                // And the bits of the f32 bias gradient, so that bf16 training's bias gradient
                // is f32 training's.
                let mut f32_sums = vec![0.0f32; m];
                elementwise::bias_backward(m, &a, &mut f32_sums);
                assert_eq!(
                    sums, f32_sums,
                    "column sums of A {ctx}: bias_backward's bits"
                );
            });
        }
    }
}
