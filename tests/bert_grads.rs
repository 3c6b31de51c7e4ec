//! Every parameter of a 2-layer BERT receives a non-zero gradient through the fused path.

use std::collections::BTreeMap;
use std::path::Path;

use scalpel::autograd::ops;
use scalpel::autograd::Var;
use scalpel::models::bert::{Bert, BertConfig, ForwardOptions};
use scalpel::models::tokenizer::Batch;
use scalpel::tensor::Tensor;

#[test]
fn every_parameter_of_a_two_layer_bert_gets_a_gradient() {
    let raw = serde_json::json!({
        "model_type": "bert", "vocab_size": 40, "hidden_size": 12, "num_hidden_layers": 2,
        "num_attention_heads": 3, "intermediate_size": 20, "max_position_embeddings": 16,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"
    });
    let config = BertConfig::from_json(&raw, Path::new("config.json")).unwrap();
    let mut tensors = BTreeMap::new();
    for (i, (name, shape)) in config.expected_tensors().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|j| (((i * 7919 + j * 104729) % 1000) as f32 / 1000.0 - 0.5) * 0.4)
            .collect();
        tensors.insert(name, Tensor::from_vec(&shape, values).unwrap());
    }
    let bert = Bert::from_parts(
        raw,
        tensors,
        Path::new("config.json"),
        Path::new("model.safetensors"),
    )
    .unwrap();
    // Two sequences of different lengths, so padding is exercised; id 0 (padding) also appears.
    let batch = Batch::from_ids(&[vec![1, 5, 9, 3, 2], vec![1, 7, 2]]);
    let hidden = bert.forward(&batch, &ForwardOptions::default()).unwrap();
    let pooled =
        ops::l2_normalize(&ops::mean_pool(&hidden, &Var::constant(batch.mask.clone())).unwrap())
            .unwrap();
    let target = Var::constant(
        Tensor::from_vec(
            pooled.shape(),
            (0..24).map(|i| (i as f32 * 0.37).sin()).collect(),
        )
        .unwrap(),
    );
    let grads = ops::mse_loss(&pooled, &target).unwrap().backward().unwrap();
    let mut checked = 0;
    for (name, var) in bert.params.trainable() {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let norm: f64 = g.to_vec::<f64>().iter().map(|x| x * x).sum::<f64>().sqrt();
        // Token type row 1 and unused vocabulary rows are legitimately zero; the tensor is not.
        assert!(norm > 0.0, "{name} gradient is all zero");
        checked += 1;
    }
    assert_eq!(checked, 5 + 2 * 16);
}
