//! `ops::linear_bf16`, the linear layer of mixed-precision training, against independent
//! references: its forward equals the bf16 GEMM of the bf16-rounded weight (what `--dtype bf16`
//! inference multiplies by) bit for bit; its input and weight gradients equal the f64 products
//! of the bf16-rounded operands (`dY·W`, `dYᵀ·X`) within f32 accumulation (the product of two
//! bf16 values is exact in f32, so only the summation order differs); the bias gradient equals
//! f32 `linear`'s exactly; and a weight changed in place is rounded again on the next call.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_autograd::{ops, Var};
use scalpel_tensor::{DType, Tensor};

fn uniform(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()).unwrap()
}

/// `t` rounded to bf16 (the tensor crate's conversion, not the GEMM's), widened to f64.
fn rounded(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::BF16).to_vec::<f64>()
}

/// `sum(y ∘ r)` through f32 `linear`, so that the upstream gradient of `y` is `r`.
fn weighted_sum(y: &Var, r: &Tensor) -> Var {
    let n = y.value().numel();
    let flat = ops::reshape(y, &[1, n]).unwrap();
    let r = Var::constant(r.clone().reshape(&[1, n]).unwrap());
    ops::linear(&flat, &r, None).unwrap()
}

#[test]
fn linear_bf16_forward_and_gradients_match_their_references() {
    // Ragged sizes: 2·9 rows against the 14-row tile, 37 inputs and 19 outputs off the 32-wide
    // panels and the 32-deep padding.
    let (batch, seq, in_f, out_f) = (2, 9, 37, 19);
    let x = Var::parameter(uniform(&[batch, seq, in_f], 1));
    let w = Var::parameter(uniform(&[out_f, in_f], 2));
    let b = Var::parameter(uniform(&[out_f], 3));
    let r = uniform(&[batch, seq, out_f], 4);

    let y = ops::linear_bf16(&x, &w, Some(&b)).unwrap();
    let w_bf16 = Var::constant(w.value().to_dtype(DType::BF16));
    let inference = ops::linear(&Var::constant(x.value().clone()), &w_bf16, Some(&b)).unwrap();
    assert_eq!(
        y.value().to_vec::<f32>(),
        inference.value().to_vec::<f32>(),
        "the forward should be the bf16 GEMM of the rounded weight"
    );
    let exact = ops::linear(&x, &w, Some(&b)).unwrap();
    let differs = y
        .value()
        .to_vec::<f32>()
        .iter()
        .zip(exact.value().to_vec::<f32>())
        .any(|(a, b)| *a != b);
    assert!(differs, "the forward equals f32's: bf16 did not run");

    let grads = weighted_sum(&y, &r).backward().unwrap();
    let grads32 = weighted_sum(&exact, &r).backward().unwrap();
    assert_eq!(
        grads.get(&b).unwrap().to_vec::<f32>(),
        grads32.get(&b).unwrap().to_vec::<f32>(),
        "the bias gradient should be f32 linear's"
    );

    let (rr, wr, xr) = (rounded(&r), rounded(w.value()), rounded(x.value()));
    let rows = batch * seq;
    // `got[i·cols + j]` against `Σ_t term(i, j, t)` over `depth` terms, in f64.
    let check = |name: &str,
                 got: &Tensor,
                 cols: usize,
                 depth: usize,
                 term: &dyn Fn(usize, usize, usize) -> f64| {
        let got = got.to_vec::<f32>();
        for (at, &g) in got.iter().enumerate() {
            let (i, j) = (at / cols, at % cols);
            let want: f64 = (0..depth).map(|t| term(i, j, t)).sum();
            let magnitude: f64 = (0..depth).map(|t| term(i, j, t).abs()).sum();
            let bound = (depth as f64 + 2.0) * f32::EPSILON as f64 * magnitude;
            assert!(
                (g as f64 - want).abs() <= bound,
                "{name}[{i}, {j}] = {g}, want {want} ± {bound:e}"
            );
        }
    };
    check("dX", grads.get(&x).unwrap(), in_f, out_f, &|i, j, o| {
        rr[i * out_f + o] * wr[o * in_f + j]
    });
    check("dW", grads.get(&w).unwrap(), in_f, rows, &|o, j, t| {
        rr[t * out_f + o] * xr[t * in_f + j]
    });
    let dw32 = grads32.get(&w).unwrap().to_vec::<f32>();
    assert_ne!(
        grads.get(&w).unwrap().to_vec::<f32>(),
        dw32,
        "the weight gradient equals f32's: bf16 did not run"
    );
}

#[test]
fn a_weight_changed_in_place_is_rounded_again() {
    let x = Var::constant(uniform(&[3, 40], 5));
    let mut w = Var::parameter(uniform(&[17, 40], 6));
    let before = ops::linear_bf16(&x, &w, None)
        .unwrap()
        .value()
        .to_vec::<f32>();
    for v in w.value_mut().unwrap().values_mut::<f32>().unwrap() {
        *v = -*v;
    }
    let after = ops::linear_bf16(&x, &w, None)
        .unwrap()
        .value()
        .to_vec::<f32>();
    let negated: Vec<f32> = before.iter().map(|v| -v).collect();
    assert_eq!(
        after, negated,
        "the second call should multiply by the negated weight, not the first packing"
    );
}

/// `ops::attention_bf16` (bf16 inference's and mixed-precision training's attention): its value
/// and `lse` are the tensor crate's bf16 attention's, and its gradients are the tensor crate's
/// bf16 backward of them (the kernels are checked against f64 in the tensor crate), for every
/// input that wants one: none dropped, none f32.
#[test]
fn bf16_attention_forward_and_gradients_are_the_bf16_kernels() {
    let (batch, seq, width, heads) = (2, 5, 12, 3);
    let [q, k, v] = [21, 22, 23].map(|seed| uniform(&[batch, seq, width], seed));
    let mask = Tensor::from_vec(
        &[batch, seq],
        vec![1.0f32, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    )
    .unwrap();
    let r = uniform(&[batch, seq, width], 24);
    let [qv, kv, vv] = [&q, &k, &v].map(|t| Var::parameter(t.clone()));
    let mv = Var::constant(mask.clone());
    let y = ops::attention_bf16(&qv, &kv, &vv, &mv, heads).unwrap();
    let (want, lse) = scalpel_tensor::ops::attention_bf16(&q, &k, &v, &mask, heads).unwrap();
    assert_eq!(y.value().to_vec::<f32>(), want.to_vec::<f32>());
    let (exact, _) = scalpel_tensor::ops::attention(&q, &k, &v, &mask, heads).unwrap();
    assert_ne!(
        want.to_vec::<f32>(),
        exact.to_vec::<f32>(),
        "bf16 attention equals f32's: bf16 did not run"
    );

    let grads = weighted_sum(&y, &r).backward().unwrap();
    let (dq, dk, dv) =
        scalpel_tensor::ops::attention_backward_bf16(&q, &k, &v, &mask, heads, &want, &lse, &r)
            .unwrap();
    for (name, var, want) in [("q", &qv, dq), ("k", &kv, dk), ("v", &vv, dv)] {
        let got = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(got.to_vec::<f32>(), want.to_vec::<f32>(), "d{name}");
    }
}

/// bf16 inference rounds a GEMM input once where it is made: `round_to_bf16` before several
/// linears, and `linear_gelu_bf16_rounded`, whose GEMM stores its output as bf16. Both give the
/// bits of rounding at each GEMM (the tensor crate's conversion), and the linear reading the
/// bf16 output in place gives the bits of reading its f32 original.
#[test]
fn bf16_inference_rounds_once_with_the_bits_of_rounding_at_each_gemm() {
    let (rows, in_f, mid_f, out_f) = (37, 45, 70, 19);
    let x = Var::constant(uniform(&[rows, in_f], 31));
    let w1 = Var::constant(uniform(&[mid_f, in_f], 32).to_dtype(DType::BF16));
    let b1 = Var::constant(uniform(&[mid_f], 33));
    let w2 = Var::constant(uniform(&[out_f, mid_f], 34).to_dtype(DType::BF16));

    let x_bf16 = ops::round_to_bf16(&x).unwrap();
    assert_eq!(x_bf16.value().dtype(), DType::BF16);
    let values = |v: &Var| v.value().to_vec::<f32>();
    assert_eq!(
        values(&x_bf16),
        values(&Var::constant(x.value().to_dtype(DType::BF16)))
    );
    assert_eq!(
        values(&ops::linear(&x_bf16, &w1, Some(&b1)).unwrap()),
        values(&ops::linear(&x, &w1, Some(&b1)).unwrap()),
        "a linear of the rounded input should be the linear of the f32 one"
    );

    let inner = ops::linear_gelu_bf16_rounded(&x, &w1, Some(&b1)).unwrap();
    assert_eq!(inner.value().dtype(), DType::BF16);
    let inner_f32 = ops::gelu(&ops::linear_bf16(&x, &w1, Some(&b1)).unwrap()).unwrap();
    assert_eq!(
        values(&inner),
        inner_f32.value().to_dtype(DType::BF16).to_vec::<f32>(),
        "the GEMM's bf16 output should be its f32 output rounded to nearest even"
    );
    assert_eq!(
        values(&ops::linear(&inner, &w2, None).unwrap()),
        values(&ops::linear(&inner_f32, &w2, None).unwrap()),
        "the next linear should read the bf16 output as it would round the f32 one"
    );
}

/// Mixed-precision training rounds the same GEMM inputs once too: `x` by `round_to_bf16` for
/// two linears, and the FFN's GELU output by `linear_gelu_bf16_rounded`. Against the graph that
/// leaves each linear to round its own f32 input (`linear_bf16` of `x`, and of `gelu` of the
/// first linear), the outputs and every gradient (the input's, reached through both, the
/// weights' and the biases') have the same bits: the forward GEMMs and the weight gradients read
/// the rounded values either way, and the gradient passes through the rounding unchanged.
#[test]
fn bf16_training_rounds_once_with_the_bits_of_rounding_at_each_gemm() {
    let (rows, in_f, mid_f, out_f) = (37, 45, 70, 19);
    let param = |shape: &[usize], seed| Var::parameter(uniform(shape, seed));
    let x = param(&[rows, in_f], 41);
    let (w1, b1) = (param(&[mid_f, in_f], 42), param(&[mid_f], 43));
    let (w2, b2) = (param(&[out_f, mid_f], 44), param(&[out_f], 45));
    let w3 = param(&[out_f, in_f], 46);
    let (r_ffn, r_side) = (uniform(&[rows, out_f], 47), uniform(&[rows, out_f], 48));
    let loss = |ffn: Var, side: Var| {
        ops::add(&weighted_sum(&ffn, &r_ffn), &weighted_sum(&side, &r_side)).unwrap()
    };

    let x_bf16 = ops::round_to_bf16(&x).unwrap();
    let inner = ops::linear_gelu_bf16_rounded(&x_bf16, &w1, Some(&b1)).unwrap();
    assert_eq!(inner.value().dtype(), DType::BF16);
    let once = [
        ops::linear_bf16(&inner, &w2, Some(&b2)).unwrap(),
        ops::linear_bf16(&x_bf16, &w3, None).unwrap(),
    ];
    let inner_f32 = ops::gelu(&ops::linear_bf16(&x, &w1, Some(&b1)).unwrap()).unwrap();
    let each = [
        ops::linear_bf16(&inner_f32, &w2, Some(&b2)).unwrap(),
        ops::linear_bf16(&x, &w3, None).unwrap(),
    ];
    let bits = |t: &Tensor| {
        t.to_vec::<f32>()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    for (name, a, b) in [("FFN", &once[0], &each[0]), ("side", &once[1], &each[1])] {
        assert_eq!(bits(a.value()), bits(b.value()), "{name} output");
    }
    let [ffn, side] = once;
    let grads_once = loss(ffn, side).backward().unwrap();
    let [ffn, side] = each;
    let grads_each = loss(ffn, side).backward().unwrap();
    for (name, var) in [
        ("x", &x),
        ("W1", &w1),
        ("b1", &b1),
        ("W2", &w2),
        ("b2", &b2),
        ("W3", &w3),
    ] {
        let got = grads_once
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let want = grads_each
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(got.dtype(), DType::F32, "d{name}");
        assert_eq!(bits(got), bits(want), "d{name}");
    }
}
