//! Sequential (MLP) models: JSON/tensor mismatches are errors naming the tensor, save/load is
//! exact, and freezing the first N parameters keeps them bit-identical while the rest train.

use crate::common;

use std::collections::BTreeMap;

use common::*;
use scalpel::autograd::optim::{decays_by_default, Adam, AdamConfig};
use scalpel::autograd::{ops, Var};
use scalpel::models::sequential::{Layer, Sequential, SequentialSpec};
use scalpel::tensor::{safetensors, Tensor};

fn spec() -> SequentialSpec {
    serde_json::from_str(
        r#"{"layers": [{"type": "linear", "in": 8, "out": 16}, {"type": "gelu"},
                       {"type": "linear", "in": 16, "out": 16}, {"type": "gelu"},
                       {"type": "linear", "in": 16, "out": 3}]}"#,
    )
    .unwrap()
}

fn inputs(rows: usize) -> Var {
    let values: Vec<f32> = (0..rows * 8)
        .map(|i| ((i * 37 % 29) as f32 / 14.5) - 1.0)
        .collect();
    Var::constant(Tensor::from_vec(&[rows, 8], values).unwrap())
}

/// Saves `spec()` weights after `edit` and returns the load error.
fn load_error(name: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> String {
    let dir = scratch(name);
    let model = Sequential::init(spec(), 0).unwrap();
    model.save(&dir).unwrap();
    let mut tensors = model.params.to_tensors();
    edit(&mut tensors);
    safetensors::save(&dir.join("model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    match Sequential::load(&dir) {
        Ok(_) => panic!("{name}: loaded although the tensors do not match mlp.json"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn mismatches_name_the_tensor() {
    let missing = load_error("seq_missing", |t| {
        t.remove("layers.2.bias");
    });
    assert!(missing.contains("`layers.2.bias` is missing"), "{missing}");

    let shape = load_error("seq_shape", |t| {
        t.insert(
            "layers.4.weight".into(),
            Tensor::zeros(&[3, 15], scalpel::tensor::DType::F32),
        );
    });
    assert!(
        shape.contains("`layers.4.weight`")
            && shape.contains("[3, 15]")
            && shape.contains("[3, 16]"),
        "{shape}"
    );

    let extra = load_error("seq_extra", |t| {
        t.insert(
            "layers.1.weight".into(),
            Tensor::zeros(&[2], scalpel::tensor::DType::F32),
        );
    });
    assert!(
        extra.contains("`layers.1.weight` is not described"),
        "{extra}"
    );

    // A JSON whose widths do not chain.
    let dir = scratch("seq_chain");
    std::fs::write(
        dir.join("mlp.json"),
        r#"{"layers": [{"type": "linear", "in": 4, "out": 5}, {"type": "linear", "in": 6, "out": 2}]}"#,
    )
    .unwrap();
    safetensors::save(
        &dir.join("model.safetensors"),
        &BTreeMap::new(),
        &BTreeMap::new(),
    )
    .unwrap();
    let chain = Sequential::load(&dir).err().unwrap().to_string();
    assert!(
        chain.contains("layer 1 takes 6 inputs but layer 0 outputs 5"),
        "{chain}"
    );

    // An unknown layer type.
    std::fs::write(dir.join("mlp.json"), r#"{"layers": [{"type": "conv"}]}"#).unwrap();
    let unknown = Sequential::load(&dir).err().unwrap().to_string();
    assert!(
        unknown.contains("mlp.json") && unknown.contains("conv"),
        "{unknown}"
    );
}

#[test]
fn save_load_round_trip_is_exact() {
    let dir = scratch("seq_round_trip");
    let model = Sequential::init(spec(), 42).unwrap();
    model.save(&dir).unwrap();
    let loaded = Sequential::load(&dir).unwrap();
    assert_eq!(loaded.spec, model.spec);
    let x = inputs(5);
    let (a, b) = (model.forward(&x).unwrap(), loaded.forward(&x).unwrap());
    assert_eq!(a.shape(), [5, 3]);
    assert_eq!(
        a.value().data().unwrap().as_bytes(),
        b.value().data().unwrap().as_bytes()
    );
    // The seed determines the initialisation.
    let other = Sequential::init(spec(), 43).unwrap();
    assert_ne!(
        other
            .forward(&x)
            .unwrap()
            .value()
            .data()
            .unwrap()
            .as_bytes(),
        a.value().data().unwrap().as_bytes()
    );
}

#[test]
fn freezing_the_first_n_parameters_keeps_them_bit_identical() {
    let mut model = Sequential::init(spec(), 7).unwrap();
    let frozen = model.freeze_first(3);
    assert_eq!(
        frozen,
        ["layers.0.weight", "layers.0.bias", "layers.2.weight"]
    );
    let before = model.params.to_tensors();
    let x = inputs(12);
    let gold: Vec<usize> = (0..12).map(|i| i % 3).collect();
    let mut opt = Adam::new(AdamConfig::adamw(0.01), decays_by_default);
    let mut first_loss = None;
    let mut loss_value = 0.0;
    for _ in 0..20 {
        let loss = ops::cross_entropy(&model.forward(&x).unwrap(), &gold).unwrap();
        loss_value = loss.value().to_vec::<f64>()[0];
        first_loss.get_or_insert(loss_value);
        let grads = loss.backward().unwrap();
        opt.step(&mut model.params, &grads, 1e-2).unwrap();
    }
    assert!(
        loss_value < first_loss.unwrap(),
        "the unfrozen layers did not learn"
    );
    assert_eq!(
        opt.state_len(),
        3,
        "frozen parameters must have no optimiser state"
    );
    let after = model.params.to_tensors();
    for name in model.param_names() {
        let same =
            before[&name].data().unwrap().as_bytes() == after[&name].data().unwrap().as_bytes();
        assert_eq!(
            same,
            frozen.contains(&name),
            "{name}: frozen={} but same={same}",
            frozen.contains(&name)
        );
    }
}

#[test]
fn surgery_drop_and_push() {
    let mut model = Sequential::init(spec(), 1).unwrap();
    model.drop_last(2).unwrap();
    assert_eq!(model.params.len(), 4);
    let err = model
        .push(
            Layer::Linear {
                in_features: 8,
                out_features: 4,
            },
            0,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("takes 8 inputs"), "{err}");
    model
        .push(
            Layer::Linear {
                in_features: 16,
                out_features: 4,
            },
            0,
        )
        .unwrap();
    assert_eq!(model.forward(&inputs(2)).unwrap().shape(), [2, 4]);
    assert!(model.params.get("layers.3.weight").unwrap().requires_grad());
}
