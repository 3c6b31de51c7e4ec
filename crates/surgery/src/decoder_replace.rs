//! Replacing a removed block of decoder layers by one trained layer (LLM-Streamline, Chen et al.
//! 2024): the new layer starts as a copy of the block's first layer and learns, by AdamW on the
//! mean squared error, to map the residual stream entering the block to the one leaving it, on
//! calibration windows. The rest of the model is untouched; `heal` can then heal all of it.

use std::collections::BTreeMap;
use std::ops::Range;

use scalpel_autograd::optim::{Adam, AdamConfig, Schedule};
use scalpel_autograd::{ops, Params, Var};
use scalpel_models::llama::Llama;
use scalpel_tensor::Tensor;

use crate::decoder::DecoderCalibration;
use crate::decoder_heal::llama_decays;
use crate::heal::{optimizer_step, plan_run, Budget, HealOptions};
use crate::{Result, SurgeryError};

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReplaceOptions {
    pub steps: usize,
    pub lr: f64,
    /// Calibration windows per step.
    pub batch_size: usize,
    pub seed: u64,
}

/// The trained stand-in for a block and how well it reproduces the block.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Replacement {
    pub first: usize,
    pub last: usize,
    /// Mean squared error against the block's output on the calibration windows: of the copy
    /// of the block's first layer, and of the trained layer.
    pub mse_copy: f64,
    pub mse_trained: f64,
    /// Each step's batch loss.
    pub losses: Vec<f64>,
    /// The trained layer's tensors, named as layer `first` of the cut model
    /// (`model.layers.{first}.*`).
    #[serde(skip)]
    pub weights: BTreeMap<String, Tensor>,
}

/// Per calibration window, the residual stream entering layer `block.start` and leaving layer
/// `block.end − 1`, `[1, seq, hidden]` each.
pub fn block_states(
    model: &Llama,
    data: &DecoderCalibration,
    block: &Range<usize>,
) -> Result<Vec<(Tensor, Tensor)>> {
    data.windows
        .iter()
        .map(|window| {
            let states = model.layer_states(window, 1)?;
            Ok((
                states[block.start].value().clone(),
                states[block.end].value().clone(),
            ))
        })
        .collect()
}

/// A one-layer model holding a trainable copy of `model`'s layer `l` as its layer 0.
fn copy_of_layer(model: &Llama, l: usize) -> Llama {
    let prefix = format!("model.layers.{l}.");
    let mut params = Params::default();
    for (name, var) in model.params.iter() {
        if let Some(rest) = name.strip_prefix(&prefix) {
            params.insert(
                format!("model.layers.0.{rest}"),
                Var::parameter(var.value().clone()),
            );
        }
    }
    let mut config = model.config.clone();
    config.num_hidden_layers = 1;
    Llama { config, params }
}

/// The windows `indices` of `states` stacked into one batch `[n, seq, hidden]`: inputs, outputs.
fn stack(states: &[(Tensor, Tensor)], indices: &[usize]) -> Result<(Var, Tensor)> {
    let pick = |side: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
        let parts: Vec<Tensor> = indices.iter().map(|&i| side(&states[i]).clone()).collect();
        Ok(Tensor::concat(&parts)?)
    };
    Ok((Var::constant(pick(|s| &s.0)?), pick(|s| &s.1)?))
}

/// Mean squared error of `layer` (layer 0 of a one-layer model) against the block's output over
/// every window.
fn block_mse(layer: &Llama, states: &[(Tensor, Tensor)]) -> Result<f64> {
    let mut sum = 0.0;
    for i in 0..states.len() {
        let (input, target) = stack(states, &[i])?;
        let out = layer.layer_forward(0, &input)?;
        sum += ops::mse_loss(&out, &Var::constant(target))?
            .value()
            .to_vec::<f64>()[0];
    }
    Ok(sum / states.len() as f64)
}

/// Trains one layer, initialised from `model`'s layer `block.start`, to reproduce the block
/// `block` (at least two layers) on the calibration windows.
pub fn train_replacement(
    model: &Llama,
    data: &DecoderCalibration,
    block: Range<usize>,
    opts: &ReplaceOptions,
) -> Result<Replacement> {
    let layers = model.config.num_hidden_layers;
    if block.len() < 2 || block.end > layers {
        return Err(SurgeryError::Invalid(format!(
            "--replace needs a block of at least 2 of the model's {layers} layers to stand in \
             for, not layers {block:?}"
        )));
    }
    let heal_opts = HealOptions {
        budget: Budget {
            steps: Some(opts.steps),
            ..Budget::default()
        },
        batch_size: opts.batch_size,
        lr: opts.lr,
        weight_decay: 0.0,
        dropout: 0.0,
        shuffle: true,
        seed: opts.seed,
        freeze: Vec::new(),
        schedule: Schedule::Constant,
        warmup: 0,
        clip: None,
        precision: Default::default(),
        group_by_length: false,
    };
    let (order, total) = plan_run(&heal_opts, data.windows.len())?;
    let states = block_states(model, data, &block)?;
    let mut layer = copy_of_layer(model, block.start);
    let mse_copy = block_mse(&layer, &states)?;
    let mut adam = Adam::new(AdamConfig::adamw(0.0), llama_decays);
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 1..=opts.steps {
        let (input, target) = stack(&states, &order.batch(step - 1))?;
        let loss = ops::mse_loss(&layer.layer_forward(0, &input)?, &Var::constant(target))?;
        let (value, _) =
            optimizer_step(loss, &mut layer.params, &mut adam, &heal_opts, step, total)?;
        losses.push(value);
    }
    layer.params.freeze(|_| true);
    let mse_trained = block_mse(&layer, &states)?;
    let weights = layer
        .params
        .to_tensors()
        .into_iter()
        .map(|(name, t)| {
            let rest = name
                .strip_prefix("model.layers.0.")
                .expect("one layer's names");
            (format!("model.layers.{}.{rest}", block.start), t)
        })
        .collect();
    Ok(Replacement {
        first: block.start,
        last: block.end - 1,
        mse_copy,
        mse_trained,
        losses,
        weights,
    })
}
