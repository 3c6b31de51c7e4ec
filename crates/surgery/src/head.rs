//! A new classification head on the pooled sentence embedding, for sentence-pair tasks (SICK
//! entailment): `logits = classifier([u, v, |u − v|, u ∘ v])`, where `u` and `v` are the pooled
//! (and, as the checkpoint says, normalised) embeddings of the two sentences, as in SBERT's
//! softmax classifier. The head is `Linear(4·hidden → labels)`, created fresh with a seeded
//! PyTorch-style initialisation (never loaded), trained with cross-entropy and AdamW.
//!
//! With a frozen backbone the embeddings are computed once and only the head trains; otherwise
//! the whole encoder is fine-tuned with its own (smaller) learning rate.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use scalpel_autograd::optim::{decays_by_default, Adam, AdamConfig};
use scalpel_autograd::{ops, Params, Var};
use scalpel_models::bert::ForwardOptions;
use scalpel_models::sentence::SentenceEncoder;
use scalpel_models::sequential::init_linear;
use scalpel_tensor::{safetensors, DType, Tensor};

use crate::checkpoint::{check_output, write_staged};
use crate::data::PairFile;
use crate::heal::BatchOrder;
use crate::{io_err, Result, SurgeryError};

/// The head's input, as recorded in `head.json`.
pub const FEATURES: &str =
    "concat(u, v, |u - v|, u * v) of the pooled embeddings of sentence_A (u) and sentence_B (v)";
pub const WEIGHT: &str = "classifier.weight";
pub const BIAS: &str = "classifier.bias";

#[derive(Clone, Debug)]
pub struct NewHeadOptions {
    /// Number of classes the user expects; must equal the distinct labels of the training file.
    pub labels: usize,
    pub freeze_backbone: bool,
    pub epochs: usize,
    pub batch_size: usize,
    /// Learning rate of the head.
    pub lr: f64,
    /// Learning rate of the encoder when it is not frozen.
    pub backbone_lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

/// What `head.json` records besides the tensors.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HeadReport {
    /// Class names; class `i` is row `i` of `classifier.weight`.
    pub labels: Vec<String>,
    pub input_features: String,
    pub in_features: usize,
    pub frozen_backbone: bool,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub epochs: usize,
    pub steps: usize,
    /// Eval accuracy of the untrained head and after training.
    pub accuracy_before: f64,
    pub accuracy_after: f64,
    /// Accuracy of always predicting the eval file's most frequent class.
    pub majority_rate: f64,
    pub final_loss: f64,
    pub seconds: f64,
}

/// The distinct labels of `pairs` in sorted order; every pair must carry one.
pub fn label_names(pairs: &PairFile) -> Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for (i, p) in pairs.pairs.iter().enumerate() {
        let label = p.label.as_ref().ok_or_else(|| {
            SurgeryError::Invalid(format!(
                "{}: pair {} has no label (new-head needs a SICK file with an entailment_judgment column)",
                pairs.path.display(),
                i + 1
            ))
        })?;
        if !names.contains(label) {
            names.push(label.clone());
        }
    }
    names.sort();
    Ok(names)
}

fn targets(pairs: &PairFile, names: &[String]) -> Result<Vec<usize>> {
    label_names(pairs)?;
    pairs
        .pairs
        .iter()
        .map(|p| {
            let l = p.label.as_ref().expect("checked above");
            names.iter().position(|n| n == l).ok_or_else(|| {
                SurgeryError::Invalid(format!(
                    "{}: label `{l}` does not occur in the training file (its labels: {})",
                    pairs.path.display(),
                    names.join(", ")
                ))
            })
        })
        .collect()
}

/// A fresh `Linear(in_features → labels)` head named `classifier.*`, trainable.
pub fn init_head(in_features: usize, labels: usize, seed: u64) -> Params {
    let (w, b) = init_linear(in_features, labels, seed);
    let mut tensors = BTreeMap::new();
    tensors.insert(WEIGHT.to_string(), w);
    tensors.insert(BIAS.to_string(), b);
    Params::from_tensors(tensors)
}

/// Head logits of feature rows `[rows, 4·hidden]`.
pub fn logits(head: &Params, features: &Var) -> Result<Var> {
    Ok(ops::linear(
        features,
        head.get(WEIGHT)?,
        Some(head.get(BIAS)?),
    )?)
}

/// Embeds every distinct sentence of `files` once (inference: no graph).
fn embed_all(
    encoder: &SentenceEncoder,
    files: &[&PairFile],
    batch_size: usize,
) -> Result<HashMap<String, Vec<f32>>> {
    let mut texts: Vec<&str> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for f in files {
        for p in &f.pairs {
            for s in [&p.first, &p.second] {
                if seen.insert(s.as_str()) {
                    texts.push(s);
                }
            }
        }
    }
    let emb = encoder.embed(&texts, batch_size)?;
    let d = emb.dim(-1);
    let values = emb.to_vec::<f32>();
    Ok(texts
        .iter()
        .zip(values.chunks_exact(d))
        .map(|(t, row)| (t.to_string(), row.to_vec()))
        .collect())
}

/// Feature rows `[idx.len(), 4d]` of the pairs `idx` from precomputed embeddings.
fn features_from_cache(
    pairs: &PairFile,
    idx: &[usize],
    cache: &HashMap<String, Vec<f32>>,
) -> Result<Var> {
    let d = cache.values().next().map_or(0, Vec::len);
    let mut u = Vec::with_capacity(idx.len() * d);
    let mut v = Vec::with_capacity(idx.len() * d);
    for &i in idx {
        u.extend_from_slice(&cache[&pairs.pairs[i].first]);
        v.extend_from_slice(&cache[&pairs.pairs[i].second]);
    }
    let u = Var::constant(Tensor::from_vec(&[idx.len(), d], u)?);
    let v = Var::constant(Tensor::from_vec(&[idx.len(), d], v)?);
    Ok(ops::pair_features(&u, &v)?)
}

/// Features through the encoder (differentiable when its parameters are trainable).
fn features_from_encoder(
    encoder: &SentenceEncoder,
    pairs: &PairFile,
    idx: &[usize],
) -> Result<Var> {
    let first: Vec<&str> = idx.iter().map(|&i| pairs.pairs[i].first.as_str()).collect();
    let second: Vec<&str> = idx
        .iter()
        .map(|&i| pairs.pairs[i].second.as_str())
        .collect();
    let opts = ForwardOptions::default();
    let u = encoder.embed_batch(&encoder.tokenizer.batch(&first)?, &opts)?;
    let v = encoder.embed_batch(&encoder.tokenizer.batch(&second)?, &opts)?;
    Ok(ops::pair_features(&u, &v)?)
}

fn argmax_rows(logits: &Tensor) -> Vec<usize> {
    let c = logits.dim(-1);
    logits
        .to_vec::<f64>()
        .chunks_exact(c)
        .map(|row| {
            (0..c)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .expect("at least one class")
        })
        .collect()
}

/// Accuracy of the head on `pairs` (from the cache, or through the encoder in batches).
fn accuracy(
    head: &Params,
    pairs: &PairFile,
    gold: &[usize],
    cache: Option<&HashMap<String, Vec<f32>>>,
    encoder: &SentenceEncoder,
    batch_size: usize,
) -> Result<f64> {
    let all: Vec<usize> = (0..pairs.pairs.len()).collect();
    let mut correct = 0;
    // Inference: evaluate with a constant copy of the head so no graph is recorded.
    let mut frozen = head.clone();
    frozen.freeze(|_| true);
    for chunk in all.chunks(batch_size.max(1) * 4) {
        let f = match cache {
            Some(c) => features_from_cache(pairs, chunk, c)?,
            None => features_from_encoder(encoder, pairs, chunk)?,
        };
        let pred = argmax_rows(logits(&frozen, &f)?.value());
        correct += chunk
            .iter()
            .zip(pred)
            .filter(|&(&i, p)| gold[i] == p)
            .count();
    }
    Ok(correct as f64 / pairs.pairs.len() as f64)
}

/// Trains a new head (and, unless frozen, the encoder) on `train`; reports accuracy on `eval`
/// before and after. `log` receives progress lines. Returns the trained head.
pub fn train_new_head(
    encoder: &mut SentenceEncoder,
    train: &PairFile,
    eval: &PairFile,
    opts: &NewHeadOptions,
    mut log: impl FnMut(&str),
) -> Result<(Params, HeadReport)> {
    let names = label_names(train)?;
    if names.len() != opts.labels {
        return Err(SurgeryError::Invalid(format!(
            "--labels is {} but {} has {} distinct labels ({})",
            opts.labels,
            train.path.display(),
            names.len(),
            names.join(", ")
        )));
    }
    if opts.batch_size == 0 || opts.epochs == 0 {
        return Err(SurgeryError::Invalid(
            "--batch-size and --epochs must be at least 1".into(),
        ));
    }
    let train_gold = targets(train, &names)?;
    let eval_gold = targets(eval, &names)?;
    let mut counts = vec![0usize; names.len()];
    eval_gold.iter().for_each(|&g| counts[g] += 1);
    let majority_rate = *counts.iter().max().expect("labels") as f64 / eval_gold.len() as f64;

    let start = Instant::now();
    let hidden = encoder.bert.config.hidden_size;
    let mut head = init_head(4 * hidden, names.len(), opts.seed);
    let cache = if opts.freeze_backbone {
        log(&format!(
            "embedding the sentences of {} and {} (frozen backbone: once)",
            train.path.display(),
            eval.path.display()
        ));
        let c = embed_all(encoder, &[train, eval], 64)?;
        log(&format!(
            "embedded {} distinct sentences in {:.1} s",
            c.len(),
            start.elapsed().as_secs_f64()
        ));
        Some(c)
    } else {
        None
    };
    let accuracy_before = accuracy(
        &head,
        eval,
        &eval_gold,
        cache.as_ref(),
        encoder,
        opts.batch_size,
    )?;
    log(&format!(
        "eval accuracy before training (untrained head): {:.4}  (chance {:.4}, majority class {:.4})",
        accuracy_before,
        1.0 / names.len() as f64,
        majority_rate
    ));

    if !opts.freeze_backbone {
        encoder.bert.params.unfreeze(|_| true);
    }
    let mut head_opt = Adam::new(AdamConfig::adamw(opts.weight_decay), decays_by_default);
    let mut body_opt = Adam::new(AdamConfig::adamw(opts.weight_decay), decays_by_default);
    let order = BatchOrder::new(train.pairs.len(), opts.batch_size, true, opts.seed);
    let per_epoch = order.batches_per_epoch();
    let total = per_epoch * opts.epochs;
    let mut epoch_loss = 0.0;
    let mut final_loss = f64::NAN;
    for k in 0..total {
        let idx = order.batch(k);
        let f = match &cache {
            Some(c) => features_from_cache(train, &idx, c)?,
            None => features_from_encoder(encoder, train, &idx)?,
        };
        let gold: Vec<usize> = idx.iter().map(|&i| train_gold[i]).collect();
        let loss = ops::cross_entropy(&logits(&head, &f)?, &gold)?;
        let value = loss.value().to_vec::<f64>()[0];
        if !value.is_finite() {
            return Err(SurgeryError::Invalid(format!(
                "loss became {value} at step {}; lower --lr",
                k + 1
            )));
        }
        epoch_loss += value;
        let grads = loss.backward()?;
        drop(loss);
        head_opt.step(&mut head, &grads, opts.lr)?;
        if !opts.freeze_backbone {
            body_opt.step(&mut encoder.bert.params, &grads, opts.backbone_lr)?;
        }
        if (k + 1) % per_epoch == 0 {
            final_loss = epoch_loss / per_epoch as f64;
            log(&format!(
                "epoch {}/{}: mean loss {:.4}  ({:.1} s)",
                (k + 1) / per_epoch,
                opts.epochs,
                final_loss,
                start.elapsed().as_secs_f64()
            ));
            epoch_loss = 0.0;
        }
    }
    encoder.bert.params.freeze(|_| true);
    head.freeze(|_| true);
    let accuracy_after = accuracy(
        &head,
        eval,
        &eval_gold,
        cache.as_ref(),
        encoder,
        opts.batch_size,
    )?;
    log(&format!(
        "eval accuracy after training: {:.4}  (majority class {:.4})",
        accuracy_after, majority_rate
    ));
    let report = HeadReport {
        labels: names,
        input_features: FEATURES.to_string(),
        in_features: 4 * hidden,
        frozen_backbone: opts.freeze_backbone,
        train_pairs: train.pairs.len(),
        eval_pairs: eval.pairs.len(),
        epochs: opts.epochs,
        steps: total,
        accuracy_before,
        accuracy_after,
        majority_rate,
        final_loss,
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((head, report))
}

/// Writes the encoder as a complete model folder (tokenizer, pooling, ... copied from `source`)
/// plus `head.safetensors` (`classifier.weight`, `classifier.bias`) and `head.json`.
pub fn write_head_model(
    encoder: &SentenceEncoder,
    head: &Params,
    report: &HeadReport,
    source: &Path,
    out: &Path,
    force: bool,
) -> Result<()> {
    check_output(source, out, force)?;
    let tensors: BTreeMap<String, Tensor> = head
        .to_tensors()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::F32)))
        .collect();
    write_staged(&encoder.bert, source, out, |staging| {
        let path = staging.join("head.safetensors");
        scalpel_models::check_finite(&tensors, &path)?;
        safetensors::save(&path, &tensors, &BTreeMap::new())?;
        let path = staging.join("head.json");
        let json = serde_json::to_string_pretty(report).expect("a report serialises") + "\n";
        std::fs::write(&path, json).map_err(io_err(&path))
    })
}
