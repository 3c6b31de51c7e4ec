//! Adam/AdamW against hand-computed PyTorch semantics, convergence, state round trip.

use std::collections::BTreeMap;

use scalpel_autograd::optim::{Adam, AdamConfig};
use scalpel_autograd::{ops, Params, Var};
use scalpel_tensor::Tensor;

/// Loss `Σ (p − c)²` for a 1-parameter model: gradient `2(p − c)`.
fn quadratic(params: &Params, target: &[f64]) -> Var {
    let p = params.get("w").unwrap();
    let t = Var::constant(Tensor::from_vec(&[target.len()], target.to_vec()).unwrap());
    ops::scale(&ops::mse_loss(p, &t).unwrap(), target.len() as f64).unwrap()
}

fn params(values: &[f64]) -> Params {
    let mut map = BTreeMap::new();
    map.insert(
        "w".to_string(),
        Tensor::from_vec(&[values.len()], values.to_vec()).unwrap(),
    );
    Params::from_tensors(map)
}

#[test]
fn first_adamw_step_equals_the_hand_computed_update() {
    let (p0, c, lr, wd) = ([0.5f64, -2.0, 3.0], [1.0f64, 1.0, 1.0], 0.1, 0.01);
    let mut ps = params(&p0);
    let grads = quadratic(&ps, &c).backward().unwrap();
    let mut adam = Adam::new(AdamConfig::adamw(wd), |_| true);
    adam.step(&mut ps, &grads, lr).unwrap();
    let got = ps.get("w").unwrap().value().to_vec::<f64>();
    for i in 0..3 {
        // Step 1: m̂ = g, v̂ = g², so the Adam part is lr·g/(|g| + ε) after decoupled decay.
        let g = 2.0 * (p0[i] - c[i]);
        let want = p0[i] * (1.0 - lr * wd) - lr * g / (g.abs() + 1e-8);
        assert!(
            (got[i] - want).abs() < 1e-12,
            "element {i}: {} vs {want}",
            got[i]
        );
    }
}

#[test]
fn adam_l2_folds_decay_into_the_gradient() {
    let (p0, c, lr, wd) = ([0.5f64], [1.0f64], 0.1, 0.5);
    let mut ps = params(&p0);
    let grads = quadratic(&ps, &c).backward().unwrap();
    let mut adam = Adam::new(AdamConfig::adam(wd), |_| true);
    adam.step(&mut ps, &grads, lr).unwrap();
    let g = 2.0 * (p0[0] - c[0]) + wd * p0[0];
    let want = p0[0] - lr * g / (g.abs() + 1e-8);
    assert!((ps.get("w").unwrap().value().to_vec::<f64>()[0] - want).abs() < 1e-12);
}

#[test]
fn adam_reaches_the_optimum_of_a_quadratic() {
    let target = [1.5, -0.25, 4.0, 0.0];
    let mut ps = params(&[0.0, 0.0, 0.0, 0.0]);
    let mut adam = Adam::new(AdamConfig::adam(0.0), |_| true);
    for step in 0..3000 {
        let lr = if step < 2000 { 0.05 } else { 0.005 };
        let grads = quadratic(&ps, &target).backward().unwrap();
        adam.step(&mut ps, &grads, lr).unwrap();
    }
    let got = ps.get("w").unwrap().value().to_vec::<f64>();
    for (g, t) in got.iter().zip(target) {
        assert!((g - t).abs() < 1e-3, "{got:?} vs {target:?}");
    }
}

#[test]
fn frozen_parameters_get_no_state_and_stay_bit_identical() {
    let mut map = BTreeMap::new();
    map.insert(
        "a".to_string(),
        Tensor::from_vec(&[2], vec![1.0f64, 2.0]).unwrap(),
    );
    map.insert(
        "b".to_string(),
        Tensor::from_vec(&[2], vec![3.0f64, -1.0]).unwrap(),
    );
    let mut ps = Params::from_tensors(map);
    assert_eq!(ps.freeze(|n| n == "b"), 1);
    let before = ps.get("b").unwrap().value().clone();
    let mut adam = Adam::new(AdamConfig::adamw(0.1), |_| true);
    for _ in 0..3 {
        let sum = ops::add(ps.get("a").unwrap(), ps.get("b").unwrap()).unwrap();
        let zero = Var::constant(Tensor::zeros(&[2], scalpel_tensor::DType::F64));
        let grads = ops::mse_loss(&sum, &zero).unwrap().backward().unwrap();
        assert!(
            grads.get(ps.get("b").unwrap()).is_none(),
            "no gradient work for a frozen parameter"
        );
        adam.step(&mut ps, &grads, 0.1).unwrap();
    }
    assert_eq!(ps.get("b").unwrap().value(), &before);
    assert_ne!(ps.get("a").unwrap().value().to_vec::<f64>(), vec![1.0, 2.0]);
    assert_eq!(adam.state_len(), 1);
}

#[test]
fn optimiser_state_round_trips_and_continues_identically() {
    let target = [1.0, 2.0];
    let run = |resume_at: Option<usize>| {
        let mut ps = params(&[0.0, 0.0]);
        let mut adam = Adam::new(AdamConfig::adamw(0.01), |_| true);
        let path =
            std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("adam_state.safetensors");
        for step in 0..6 {
            if Some(step) == resume_at {
                adam.save(&path).unwrap();
                adam = Adam::new(AdamConfig::adamw(0.01), |_| true);
                adam.load(&path).unwrap();
            }
            let grads = quadratic(&ps, &target).backward().unwrap();
            adam.step(&mut ps, &grads, 0.1).unwrap();
        }
        ps.get("w").unwrap().value().to_vec::<f64>()
    };
    assert_eq!(run(None), run(Some(3)));
}

#[test]
fn a_step_count_that_is_not_one_number_is_an_error() {
    let dir = std::env::temp_dir().join(format!("scalpel-adam-step-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("optimizer.safetensors");
    let moments = scalpel_tensor::Tensor::zeros(&[2], scalpel_tensor::DType::F32);
    for step in [vec![], vec![1i64, 2], vec![-1]] {
        let n = step.len();
        let tensors = std::collections::BTreeMap::from([
            ("w.m".to_string(), moments.clone()),
            ("w.v".to_string(), moments.clone()),
            (
                "w.step".to_string(),
                scalpel_tensor::Tensor::from_vec(&[n], step.clone()).unwrap(),
            ),
        ]);
        scalpel_tensor::safetensors::save(&path, &tensors, &Default::default()).unwrap();
        let err = Adam::new(AdamConfig::adamw(0.0), |_| true)
            .load(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`w.step` must be one non-negative count"),
            "{step:?}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
