//! Every op's hand-written backward against central finite differences in f64.
//!
//! Each op's output is reduced to the scalar `sum(out ∘ R)` with a fixed random `R`, so every
//! output element carries its own weight into the checked gradient.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_autograd::gradcheck::max_gradient_error;
use scalpel_autograd::{ops, Result, Var};
use scalpel_tensor::Tensor;

/// Central-difference step, and the worst accepted `|analytic − numeric| / max(1, |numeric|)`.
/// In f64 the truncation error is O(step²) ≈ 1e-10 and the rounding error ≈ 1e-16/step ≈ 1e-11;
/// every op here measures ≤ 1e-10, so 1e-7 leaves a 1000× margin yet still catches a missed
/// `eps` or a dropped term.
const STEP: f64 = 1e-5;
const TOLERANCE: f64 = 1e-7;

/// Uniform values in `[-scale, scale)`, reproducible per `seed`.
pub(crate) fn random(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    let values: Vec<f64> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
    Tensor::from_vec(shape, values).unwrap()
}

/// `sum(out ∘ weights)` as a `[1, 1]` variable: `linear` of the flattened output against the
/// flattened weights held constant.
fn weighted_sum(out: &Var, weights: &Tensor) -> Result<Var> {
    assert_eq!(
        out.shape(),
        weights.shape(),
        "weights must match the output"
    );
    let n = out.value().numel();
    let flat = ops::reshape(out, &[1, n])?;
    let w = Var::constant(weights.clone().reshape(&[1, n])?);
    ops::linear(&flat, &w, None)
}

/// Runs the finite-difference check of `f` (whose output is weighted by a random tensor of
/// `out_shape`) and asserts the tolerance. Scalar losses (`out_shape` `[]`) are weighted too, so
/// their backward sees an upstream gradient other than 1.
pub(crate) fn check(
    name: &str,
    inputs: &[Tensor],
    out_shape: &[usize],
    f: impl Fn(&[Var]) -> Result<Var>,
) {
    let weights = random(out_shape, 1.0, 0xC0FFEE);
    let error = max_gradient_error(inputs, |v| weighted_sum(&f(v)?, &weights), STEP).unwrap();
    assert!(
        error <= TOLERANCE,
        "{name}: worst gradient error {error:e} > {TOLERANCE:e}"
    );
}

#[test]
fn linear_with_and_without_bias() {
    let cases: [(&[usize], usize, bool); 4] = [
        (&[1, 7], 3, true),
        (&[3, 7], 1, false),
        (&[2, 3, 7], 5, true),
        (&[5, 7], 7, false),
    ];
    for (i, &(x_shape, out_features, bias)) in cases.iter().enumerate() {
        let in_features = x_shape[x_shape.len() - 1];
        let mut inputs = vec![
            random(x_shape, 1.0, 10 + i as u64),
            random(&[out_features, in_features], 1.0, 20 + i as u64),
        ];
        if bias {
            inputs.push(random(&[out_features], 1.0, 30 + i as u64));
        }
        let mut out_shape = x_shape.to_vec();
        *out_shape.last_mut().unwrap() = out_features;
        check(
            &format!("linear {x_shape:?}·[{out_features}, {in_features}]ᵀ bias={bias}"),
            &inputs,
            &out_shape,
            |v| ops::linear(&v[0], &v[1], v.get(2)),
        );
    }
}

#[test]
fn matmul_all_transpose_combinations() {
    // op(a) is [m, k], op(b) is [k, n], optionally with a leading batch dimension.
    let (m, k, n) = (3, 7, 5);
    for batch in [None, Some(2)] {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let stored = |rows: usize, cols: usize, trans: bool| {
                    let mut shape: Vec<usize> = batch.into_iter().collect();
                    shape.extend(if trans { [cols, rows] } else { [rows, cols] });
                    shape
                };
                let a = random(&stored(m, k, trans_a), 1.0, 40);
                let b = random(&stored(k, n, trans_b), 1.0, 41);
                let mut out_shape: Vec<usize> = batch.into_iter().collect();
                out_shape.extend([m, n]);
                check(
                    &format!("matmul batch={batch:?} trans_a={trans_a} trans_b={trans_b}"),
                    &[a, b],
                    &out_shape,
                    |v| ops::matmul(&v[0], &v[1], trans_a, trans_b),
                );
            }
        }
    }
}

#[test]
fn attention_with_padding_mask() {
    let (batch, seq, heads, head_dim) = (2, 5, 3, 4);
    let shape = [batch, seq, heads * head_dim];
    // Sequence 0 is full; the last two keys of sequence 1 are padding.
    let mask = Tensor::from_vec(
        &[batch, seq],
        vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
    )
    .unwrap();
    let inputs = [
        random(&shape, 1.5, 50),
        random(&shape, 1.5, 51),
        random(&shape, 1.0, 52),
    ];
    let mask = Var::constant(mask);
    check("attention", &inputs, &shape, |v| {
        ops::attention(&v[0], &v[1], &v[2], &mask, heads)
    });
}

#[test]
fn attention_padded_keys_get_no_gradient() {
    let (heads, shape) = (3, [2, 5, 12]);
    let mask = Var::constant(
        Tensor::from_vec(
            &[2, 5],
            vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
        )
        .unwrap(),
    );
    let [q, k, v] = [60, 61, 62].map(|seed| Var::parameter(random(&shape, 1.0, seed)));
    let out = ops::attention(&q, &k, &v, &mask, heads).unwrap();
    let grads = weighted_sum(&out, &random(&shape, 1.0, 63))
        .unwrap()
        .backward()
        .unwrap();
    for var in [&k, &v] {
        let grad = grads.get(var).unwrap().to_vec::<f64>();
        // Rows (batch 1, positions 3 and 4) are the masked keys.
        assert!(
            grad[(5 + 3) * 12..].iter().all(|&g| g == 0.0),
            "a padded key received a gradient"
        );
    }
}

#[test]
fn layernorm_all_inputs() {
    for (shape, eps) in [
        (&[1usize, 7][..], 1e-5),
        (&[3, 7], 1e-12),
        (&[2, 3, 5], 1e-5),
    ] {
        let cols = shape[shape.len() - 1];
        let inputs = [
            random(shape, 2.0, 70),
            random(&[cols], 1.5, 71),
            random(&[cols], 1.0, 72),
        ];
        check(
            &format!("layernorm {shape:?} eps={eps:e}"),
            &inputs,
            shape,
            |v| ops::layernorm(&v[0], &v[1], &v[2], eps),
        );
    }
}

/// An inference fast path (`fused`, every input constant) recorded no graph and gave the values
/// of the differentiable composition it stands for, to 1e-12 relative in f64.
fn assert_inference_matches(fused: &Var, composed: &Var) {
    assert!(!fused.requires_grad(), "inference recorded a graph");
    let (want, got) = (
        composed.value().values::<f64>().unwrap(),
        fused.value().values::<f64>().unwrap(),
    );
    assert_eq!(want.len(), got.len());
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        assert!(
            (w - g).abs() <= 1e-12 * (1.0 + w.abs()),
            "element {i}: {g} vs {w}"
        );
    }
}

/// With gradients wanted, the FFN's fused linear + GELU differentiates through x, W and b.
#[test]
fn linear_gelu_all_inputs() {
    let inputs = [
        random(&[3, 7], 1.0, 81),
        random(&[5, 7], 1.0, 82),
        random(&[5], 1.0, 83),
    ];
    check("linear_gelu", &inputs, &[3, 5], |v| {
        ops::linear_gelu(&v[0], &v[1], Some(&v[2]))
    });
}

/// Inference (every input constant) applies the GELU in the GEMM's epilogue; its values are
/// those of the differentiable composition.
#[test]
fn linear_gelu_inference_matches_the_composition() {
    let (x, w, b) = (
        random(&[4, 9], 1.0, 84),
        random(&[6, 9], 1.0, 85),
        random(&[6], 1.0, 86),
    );
    let composed = ops::gelu(
        &ops::linear(
            &Var::parameter(x.clone()),
            &Var::constant(w.clone()),
            Some(&Var::constant(b.clone())),
        )
        .unwrap(),
    )
    .unwrap();
    let fused = ops::linear_gelu(
        &Var::constant(x),
        &Var::constant(w),
        Some(&Var::constant(b)),
    )
    .unwrap();
    assert_inference_matches(&fused, &composed);
}

/// With gradients wanted, the residual form differentiates through every input.
#[test]
fn add_layernorm_all_inputs() {
    let shape = &[3usize, 7][..];
    let inputs = [
        random(shape, 2.0, 73),
        random(shape, 1.0, 74),
        random(&[7], 1.5, 75),
        random(&[7], 1.0, 76),
    ];
    check("add_layernorm", &inputs, shape, |v| {
        ops::add_layernorm(v[0].clone(), &v[1], &v[2], &v[3], 1e-5)
    });
}

/// Inference (every input constant) takes the in-place pass; its values are those of the
/// differentiable composition.
#[test]
fn add_layernorm_in_place_matches_the_composition() {
    let (x, r) = (random(&[5, 33], 2.0, 77), random(&[5, 33], 1.0, 78));
    let (g, b) = (random(&[33], 1.5, 79), random(&[33], 1.0, 80));
    let composed = ops::layernorm(
        &ops::add(&Var::parameter(x.clone()), &Var::constant(r.clone())).unwrap(),
        &Var::constant(g.clone()),
        &Var::constant(b.clone()),
        1e-12,
    )
    .unwrap();
    let fused = ops::add_layernorm(
        Var::constant(x),
        &Var::constant(r),
        &Var::constant(g),
        &Var::constant(b),
        1e-12,
    )
    .unwrap();
    assert_inference_matches(&fused, &composed);
}

#[test]
fn pair_features_both_operands() {
    check(
        "pair_features",
        &[random(&[3, 5], 1.0, 15), random(&[3, 5], 1.0, 16)],
        &[3, 20],
        |x| ops::pair_features(&x[0], &x[1]),
    );
}

#[test]
fn gelu() {
    let mut values = random(&[5, 7], 4.0, 80).to_vec::<f64>();
    values[..3].copy_from_slice(&[0.0, 1e-3, -1e-3]);
    let x = Tensor::from_vec(&[5, 7], values).unwrap();
    check("gelu", &[x], &[5, 7], |v| ops::gelu(&v[0]));
}

#[test]
fn dropout_with_fixed_seed() {
    let (p, seed, shape) = (0.3, 1234, [5, 7]);
    let x = random(&shape, 1.0, 90);
    // The check only means something if the mask both drops and keeps elements.
    let y = ops::dropout(&Var::constant(x.clone()), p, seed)
        .unwrap()
        .value()
        .to_vec::<f64>();
    let dropped = y.iter().filter(|&&v| v == 0.0).count();
    assert!(
        dropped > 0 && dropped < y.len(),
        "dropout p={p} dropped {dropped} of {}",
        y.len()
    );
    check("dropout", &[x], &shape, |v| ops::dropout(&v[0], p, seed));
}

#[test]
fn embedding_with_repeated_ids() {
    let table = random(&[7, 5], 1.0, 100);
    let ids = [3, 1, 3, 0, 6, 3];
    let ids = ops::Indices::new(ids.to_vec(), &[2, 3]).unwrap();
    check("embedding", &[table], &[2, 3, 5], |v| {
        ops::embedding(&v[0], &ids)
    });
}

#[test]
fn add_both_operands() {
    let inputs = [random(&[5, 7], 1.0, 110), random(&[5, 7], 1.0, 111)];
    check("add", &inputs, &[5, 7], |v| ops::add(&v[0], &v[1]));
}

#[test]
fn add_of_one_variable_to_itself_accumulates() {
    check("add(x, x)", &[random(&[3], 1.0, 112)], &[3], |v| {
        ops::add(&v[0], &v[0])
    });
}

#[test]
fn scale() {
    check("scale", &[random(&[3, 7], 1.0, 120)], &[3, 7], |v| {
        ops::scale(&v[0], -1.7)
    });
}

#[test]
fn reshape() {
    check("reshape", &[random(&[2, 3, 5], 1.0, 130)], &[6, 5], |v| {
        ops::reshape(&v[0], &[6, 5])
    });
}

#[test]
fn mean_pool_with_padding() {
    // Right-padded sequences of 5, 3 and 1 tokens.
    let mut mask = vec![0.0; 15];
    for (b, len) in [5, 3, 1].into_iter().enumerate() {
        mask[b * 5..b * 5 + len].fill(1.0);
    }
    let mask = Var::constant(Tensor::from_vec(&[3, 5], mask).unwrap());
    check("mean_pool", &[random(&[3, 5, 7], 1.0, 140)], &[3, 7], |v| {
        ops::mean_pool(&v[0], &mask)
    });
}

#[test]
fn l2_normalize() {
    check("l2_normalize", &[random(&[3, 7], 1.0, 150)], &[3, 7], |v| {
        ops::l2_normalize(&v[0])
    });
}

#[test]
fn mse_loss_both_operands() {
    let inputs = [random(&[3, 7], 1.0, 160), random(&[3, 7], 1.0, 161)];
    check("mse_loss", &inputs, &[], |v| ops::mse_loss(&v[0], &v[1]));
}

#[test]
fn cosine_loss_both_operands() {
    let inputs = [random(&[3, 7], 1.0, 170), random(&[3, 7], 1.0, 171)];
    check("cosine_loss", &inputs, &[], |v| {
        ops::cosine_loss(&v[0], &v[1])
    });
}

#[test]
fn distill_kl_at_two_temperatures() {
    let teacher = random(&[4, 9], 3.0, 175);
    for temperature in [1.0, 2.5] {
        check("distill_kl", &[random(&[4, 9], 3.0, 176)], &[], |v| {
            ops::distill_kl(&v[0], &teacher, temperature)
        });
    }
}

#[test]
fn distill_kl_of_the_teacher_itself_is_zero() {
    let logits = random(&[3, 40], 5.0, 177);
    let loss = ops::distill_kl(&Var::constant(logits.clone()), &logits, 1.5).unwrap();
    let value = loss.value().to_vec::<f64>()[0];
    assert!(
        value.abs() < 1e-12,
        "KL of a distribution with itself: {value}"
    );
}

#[test]
fn cross_entropy_with_repeated_targets() {
    let targets = [0, 6, 3, 3];
    check("cross_entropy", &[random(&[4, 7], 3.0, 180)], &[], |v| {
        ops::cross_entropy(&v[0], &targets)
    });
}

#[test]
fn chained_ops_scaled_loss() {
    // A small encoder-like chain, so gradients flow through several backward ops in sequence.
    let x = random(&[2, 3, 4], 1.0, 190);
    let w = random(&[4, 4], 0.8, 191);
    let mask =
        Var::constant(Tensor::from_vec(&[2, 3], vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0]).unwrap());
    let target = Var::constant(random(&[2, 4], 1.0, 192));
    check("chain", &[x, w], &[], |v| {
        let h = ops::gelu(&ops::linear(&v[0], &v[1], None)?)?;
        let pooled = ops::l2_normalize(&ops::mean_pool(&ops::add(&h, &v[0])?, &mask)?)?;
        ops::scale(&ops::cosine_loss(&pooled, &target)?, 3.0)
    });
}

#[test]
fn constant_inputs_get_no_gradient() {
    let x = Var::parameter(random(&[3, 7], 1.0, 200));
    let frozen_w = Var::constant(random(&[5, 7], 1.0, 201));
    let b = Var::parameter(random(&[5], 1.0, 202));
    let target = Var::constant(random(&[3, 5], 1.0, 203));
    let grads = ops::mse_loss(&ops::linear(&x, &frozen_w, Some(&b)).unwrap(), &target)
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        grads.get(&frozen_w).is_none(),
        "frozen weight received a gradient"
    );
    assert!(
        grads.get(&target).is_none(),
        "constant target received a gradient"
    );
    assert!(
        grads.get(&x).is_some() && grads.get(&b).is_some(),
        "trainable inputs lost their gradients"
    );

    let gamma = Var::constant(random(&[7], 1.0, 204));
    let beta = Var::parameter(random(&[7], 1.0, 205));
    let y = ops::layernorm(&x, &gamma, &beta, 1e-5).unwrap();
    let grads = weighted_sum(&y, &random(&[3, 7], 1.0, 206))
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        grads.get(&gamma).is_none(),
        "frozen gamma received a gradient"
    );
    assert!(grads.get(&beta).is_some() && grads.get(&x).is_some());
}

#[test]
fn all_constant_inputs_record_no_graph() {
    let x = Var::constant(random(&[3, 7], 1.0, 210));
    let w = Var::constant(random(&[5, 7], 1.0, 211));
    let y = ops::gelu(&ops::linear(&x, &w, None).unwrap()).unwrap();
    assert!(!y.requires_grad());
    let loss = ops::mse_loss(&y, &Var::constant(random(&[3, 5], 1.0, 212))).unwrap();
    assert!(loss.backward().unwrap().get(&w).is_none());
}

/// A constant weight is packed once for the CPU GEMM (the inference path), keyed by its
/// storage: the packing must give exactly the per-call result, be shared by every variable
/// holding the weight, be gone once the weight is written (`value_mut`), and never be made for a
/// trainable weight or by an input too large to gain from it.
#[test]
fn constant_linear_weight_packing_follows_its_value() {
    use scalpel_tensor::cpu::gemm::Activation;
    use scalpel_tensor::cpu::gemm_weights;
    use scalpel_tensor::ops::{self as tops, WeightUse, PACK_ONCE_MAX_ROWS};
    use scalpel_tensor::DType;
    let f32_random = |shape: &[usize], seed| random(shape, 1.0, seed).to_dtype(DType::F32);
    let per_call = |x: &Var, w: &Var, b: &Var| {
        let (x, w, b) = (x.value(), w.value(), b.value());
        tops::linear(x, w, Some(b), Activation::Identity, WeightUse::Varying).unwrap()
    };
    let x = Var::constant(f32_random(&[3, 5, 40], 11));
    let mut w = Var::constant(f32_random(&[37, 40], 12));
    let b = Var::constant(f32_random(&[37], 13));

    // More rows than pay for packing: none is made, and the result is the per-call one.
    let large = Var::constant(f32_random(&[PACK_ONCE_MAX_ROWS + 1, 40], 14));
    let large_result = ops::linear(&large, &w, Some(&b)).unwrap();
    assert!(gemm_weights::cached(w.value()).is_none());
    assert_eq!(large_result.value(), &per_call(&large, &w, &b));

    let packed_result = ops::linear(&x, &w, Some(&b)).unwrap();
    let packing = gemm_weights::cached(w.value()).expect("packed on first use");
    assert_eq!(packed_result.value(), &per_call(&x, &w, &b));
    // A large input now uses the packing that exists, with the same result.
    let from_packing = ops::linear(&large, &w, Some(&b)).unwrap();
    assert_eq!(from_packing.value(), large_result.value());
    let alias = Var::constant(w.value().clone());
    let alias_packing = gemm_weights::cached(alias.value()).expect("shared storage");
    assert!(std::sync::Arc::ptr_eq(&alias_packing, &packing));
    drop((alias, alias_packing, packing));

    w.value_mut()
        .unwrap()
        .values_mut::<f32>()
        .unwrap()
        .iter_mut()
        .for_each(|v| *v = -2.0 * *v + 0.5);
    assert!(
        gemm_weights::cached(w.value()).is_none(),
        "a packing outlived a write to its weight"
    );
    let after = ops::linear(&x, &w, Some(&b)).unwrap();
    assert_eq!(after.value(), &per_call(&x, &w, &b));

    let trainable = Var::parameter(f32_random(&[37, 40], 15));
    ops::linear(&x, &trainable, Some(&b)).unwrap();
    assert!(gemm_weights::cached(trainable.value()).is_none());
}
