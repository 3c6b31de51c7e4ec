//! Layer removal: keep any subset of the layers (a BERT encoder's or a Llama decoder's),
//! renumbered contiguously, with the config rewritten to match. The removed layers' tensors are
//! gone, so their computation is too.

use std::collections::{BTreeMap, BTreeSet};

use scalpel_autograd::Params;
use scalpel_models::bert::Bert;
use scalpel_models::llama::{Llama, LlamaCheckpoint};

use crate::{Result, SurgeryError};

/// Which layers to keep, as a user states it (recorded in `surgery.json` as
/// `{"drop": [4, 5]}`, `{"keep": [0, 1]}` or `{"truncate": 4}`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerSelection {
    Drop(Vec<usize>),
    Keep(Vec<usize>),
    /// Keep the first `k` layers.
    Truncate(usize),
}

impl LayerSelection {
    /// The sorted layer indices kept out of `total`, or an error naming the bad index.
    pub fn kept(&self, total: usize) -> Result<Vec<usize>> {
        let check = |ids: &[usize]| -> Result<()> {
            match ids.iter().find(|&&i| i >= total) {
                Some(i) => Err(SurgeryError::Invalid(format!(
                    "layer {i} is out of range: the model has layers 0..{}",
                    total - 1
                ))),
                None => Ok(()),
            }
        };
        let kept: BTreeSet<usize> = match self {
            LayerSelection::Drop(ids) => {
                check(ids)?;
                (0..total).filter(|i| !ids.contains(i)).collect()
            }
            LayerSelection::Keep(ids) => {
                check(ids)?;
                ids.iter().copied().collect()
            }
            LayerSelection::Truncate(k) => {
                if *k > total {
                    return Err(SurgeryError::Invalid(format!(
                        "cannot keep {k} layers: the model has {total}"
                    )));
                }
                (0..*k).collect()
            }
        };
        if kept.is_empty() {
            return Err(SurgeryError::Invalid(
                "this would remove every encoder layer; keep at least one".into(),
            ));
        }
        Ok(kept.into_iter().collect())
    }
}

/// Parses `4,5` and ranges like `0-3` into indices.
pub fn parse_layer_list(text: &str) -> Result<Vec<usize>> {
    let bad = || {
        SurgeryError::Invalid(format!(
            "`{text}` is not a layer list (e.g. `4,5` or `0-3`)"
        ))
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// The named tensors of a model with only the `kept` layers (sorted), renumbered
/// `0..kept.len()`: a name `{prefix}{i}.{rest}` becomes `{prefix}{new}.{rest}` for a kept `i` and
/// is dropped otherwise; names outside `prefix` are carried over unchanged.
fn renumber_layers<T>(
    named: impl IntoIterator<Item = (String, T)>,
    prefix: &str,
    kept: &[usize],
) -> Result<Vec<(String, T)>> {
    let renumber: BTreeMap<usize, usize> = kept
        .iter()
        .enumerate()
        .map(|(new, &old)| (old, new))
        .collect();
    let mut out = Vec::new();
    for (name, value) in named {
        let Some(rest) = name.strip_prefix(prefix) else {
            out.push((name, value));
            continue;
        };
        let (index, suffix) = rest.split_once('.').unwrap_or((rest, ""));
        let old: usize = index
            .parse()
            .map_err(|_| SurgeryError::Invalid(format!("tensor `{name}` has no layer index")))?;
        if let Some(new) = renumber.get(&old) {
            out.push((format!("{prefix}{new}.{suffix}"), value));
        }
    }
    Ok(out)
}

/// A new model holding only the `kept` layers (sorted), renumbered `0..kept.len()`. Every other
/// tensor is carried over unchanged; top-level config arrays with one entry per layer are
/// filtered the same way.
pub fn keep_layers(bert: &Bert, kept: &[usize]) -> Result<Bert> {
    let old_total = bert.num_layers();
    let head = format!("{}encoder.layer.", bert.prefix);
    let named = bert
        .params
        .iter()
        .map(|(name, var)| (name.to_string(), var.clone()));
    let mut params = Params::default();
    for (name, var) in renumber_layers(named, &head, kept)? {
        params.insert(name, var);
    }
    let mut raw = bert.raw_config.clone();
    if let Some(obj) = raw.as_object_mut() {
        for value in obj.values_mut() {
            if let Some(items) = value.as_array().filter(|a| a.len() == old_total) {
                *value = serde_json::Value::Array(kept.iter().map(|&i| items[i].clone()).collect());
            }
        }
        obj.insert("num_hidden_layers".into(), kept.len().into());
    }
    let mut out = bert.clone();
    out.config =
        scalpel_models::bert::BertConfig::from_json(&raw, std::path::Path::new("config.json"))?;
    out.raw_config = raw;
    out.params = params;
    Ok(out)
}

/// The in-memory model with only the `kept` decoder layers (their parameters shared, not
/// copied): what scoring by removal evaluates.
pub fn keep_llama_model_layers(model: &Llama, kept: &[usize]) -> Result<Llama> {
    let named = model
        .params
        .iter()
        .map(|(name, var)| (name.to_string(), var.clone()));
    let mut params = Params::default();
    for (name, var) in renumber_layers(named, "model.layers.", kept)? {
        params.insert(name, var);
    }
    let mut config = model.config.clone();
    config.num_hidden_layers = kept.len();
    Ok(Llama { config, params })
}

/// A Llama checkpoint with only the `kept` decoder layers (`model.layers.N.*`), renumbered, and
/// `num_hidden_layers` to match; embeddings, final norm and LM head unchanged.
pub fn keep_llama_layers(checkpoint: LlamaCheckpoint, kept: &[usize]) -> Result<LlamaCheckpoint> {
    let weights = renumber_layers(checkpoint.weights, "model.layers.", kept)?;
    let mut config = checkpoint.config;
    config.num_hidden_layers = kept.len();
    Ok(LlamaCheckpoint {
        config,
        weights: weights.into_iter().collect(),
        ..checkpoint
    })
}
