use std::path::PathBuf;

use scalpel::models::bert::Bert;
use scalpel::models::llama::LlamaCheckpoint;
use scalpel::surgery::checkpoint::{check_output, write_llama, write_model};
use scalpel::surgery::cut::{keep_layers, keep_llama_layers, parse_layer_list, LayerSelection};
use scalpel::surgery::decoder_replace::{train_replacement, ReplaceOptions};
use serde_json::json;

use scalpel::surgery::score::ScoreReport;

use super::score::{MetricArg, OneMetric, Scoring};
use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Input model (never modified): a BERT folder, or a Llama-family GGUF file (the output is
    /// then a Hugging Face `LlamaForCausalLM` folder, as `scalpel convert` writes).
    #[arg(long)]
    model: PathBuf,
    /// Output model directory.
    #[arg(long)]
    output: PathBuf,
    /// Encoder layers to remove, e.g. `4,5` or `3-5`.
    #[arg(long, conflicts_with_all = ["keep", "truncate"])]
    drop: Option<String>,
    /// Encoder layers to keep, e.g. `0-3`.
    #[arg(long, conflicts_with = "truncate")]
    keep: Option<String>,
    /// Keep the first K layers.
    #[arg(long, conflicts_with = "auto", value_parser = flags::positive)]
    truncate: Option<usize>,
    /// Keep the K layers the metric ranks highest on --data.
    #[arg(long, conflicts_with_all = ["drop", "keep"], requires = "data", value_parser = flags::positive)]
    auto: Option<usize>,
    #[command(flatten)]
    scoring: Scoring,
    /// The metric `--auto` ranks layers by (default: drop-loss for an encoder, drop-ppl for a
    /// decoder).
    #[arg(long, value_enum)]
    metric: Option<OneMetric>,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// Decoders (LLM-Streamline): the removed layers, one contiguous block, are replaced by one
    /// new layer initialised from the block's first and trained on --data windows to reproduce
    /// the block's output (MSE). With `--auto K` the model keeps K layers in all, the new one
    /// included, and the default metric is angular (the block whose ends are closest).
    #[arg(long)]
    replace: bool,
    /// --replace: AdamW steps of the new layer.
    #[arg(long, default_value_t = 200, value_parser = flags::positive)]
    replace_steps: usize,
    /// --replace: learning rate of the new layer.
    #[arg(long, default_value_t = 1e-4, value_parser = flags::finite_positive)]
    replace_lr: f64,
    /// --replace: calibration windows per step.
    #[arg(long, default_value_t = 4, value_parser = flags::positive)]
    replace_batch_size: usize,
}

impl Args {
    pub fn model(&self) -> &std::path::Path {
        &self.model
    }

    /// Only `--auto` (scoring the layers) and `--replace` (training one) run the model.
    pub fn computes(&self) -> bool {
        self.auto.is_some() || self.replace
    }
}

pub fn run(a: Args) -> CliResult {
    let explicit = match (&a.drop, &a.keep, a.truncate, a.auto) {
        (Some(d), None, None, None) => Some(LayerSelection::Drop(parse_layer_list(d)?)),
        (None, Some(k), None, None) => Some(LayerSelection::Keep(parse_layer_list(k)?)),
        (None, None, Some(k), None) => Some(LayerSelection::Truncate(k)),
        (None, None, None, Some(_)) => None,
        _ => return Err(
            "say which layers to remove with exactly one of --drop, --keep, --truncate or --auto"
                .into(),
        ),
    };
    check_output(&a.model, &a.output, a.force)?;
    if super::is_decoder(&a.model) {
        return cut_decoder(&a, explicit);
    }
    if a.replace {
        return Err(
            "--replace trains a stand-in for a block of decoder layers: it needs a Llama \
                    model (a GGUF file or a converted folder)"
                .into(),
        );
    }
    let bert = Bert::load(&a.model)?;
    let total = bert.num_layers();
    let (kept, reason, scores) = match explicit {
        Some(selection) => (selection.kept(total)?, json!(selection), None),
        None => {
            let k = a.auto.expect("only called for --auto");
            let (keep, reason, report) = auto_selection(&a, k, OneMetric::DropLoss)?;
            (keep, reason, Some(report))
        }
    };
    let cut = keep_layers(&bert, &kept)?;
    let record = surgery_record(&a, total, &kept, reason, scores, None)?;
    write_model(
        &cut,
        &a.model,
        &a.output,
        a.force,
        &[("surgery.json", record)],
    )?;
    report(&a, total, &kept);
    Ok(())
}

/// `--auto`'s choice: the `k` layers `metric` (or `--metric`) keeps, why, and the scores.
fn auto_selection(
    a: &Args,
    k: usize,
    default: OneMetric,
) -> CliResult<(Vec<usize>, serde_json::Value, ScoreReport)> {
    let report = a.scoring.run(
        &a.model,
        MetricArg::One(a.metric.unwrap_or(default)),
        Some(k),
    )?;
    let scores = &report.metrics[0];
    let keep = scores.keep.clone().expect("a target was given");
    print!("{}", report.to_table());
    let reason = json!({"auto": {"keep": k, "metric": scores.metric.name()}});
    Ok((keep, reason, report))
}

/// A Llama-family decoder (GGUF or folder) cut to an explicit or scored selection (its removed
/// block replaced by one trained layer with `--replace`), written as a Hugging Face folder.
fn cut_decoder(a: &Args, explicit: Option<LayerSelection>) -> CliResult {
    if a.replace && a.scoring.has_no_data() {
        return Err("--replace trains the new layer on calibration text: give --data".into());
    }
    let mut checkpoint = LlamaCheckpoint::load(&a.model)?;
    let total = checkpoint.config.num_hidden_layers;
    let (kept, reason, scores) = match explicit {
        Some(selection) => (selection.kept(total)?, json!(selection), None),
        None => {
            // The block's stand-in is one of the K layers.
            let k = a.auto.expect("only called for --auto") - usize::from(a.replace);
            if k == 0 {
                return Err("--auto 1 --replace would keep no layer besides the new one".into());
            }
            let default = if a.replace {
                OneMetric::Angular
            } else {
                OneMetric::DropPpl
            };
            let (keep, reason, report) = auto_selection(a, k, default)?;
            (keep, reason, Some(report))
        }
    };
    if !a.replace {
        let record = surgery_record(a, total, &kept, reason, scores, None)?;
        let cut = keep_llama_layers(checkpoint, &kept)?;
        write_llama(&cut, &a.output, &[("surgery.json", record)])?;
        report(a, total, &kept);
        return Ok(());
    }
    let block = contiguous_block(total, &kept)?;
    let model = checkpoint.model(&a.model)?;
    let data = a.scoring.decoder_windows(&checkpoint)?;
    let opts = ReplaceOptions {
        steps: a.replace_steps,
        lr: a.replace_lr,
        batch_size: a.replace_batch_size,
        seed: 0,
    };
    eprintln!(
        "training one layer to stand in for layers {}-{} ({} steps on {} windows)",
        block.start,
        block.end - 1,
        opts.steps,
        data.windows.len()
    );
    let replacement = train_replacement(&model, &data, block.clone(), &opts)?;
    println!(
        "replacement for layers {}-{}: block-output MSE {:.6} as a copy of layer {} -> {:.6} trained",
        replacement.first, replacement.last, replacement.mse_copy, block.start, replacement.mse_trained
    );
    checkpoint.weights = model.params.to_tensors();
    let mut layers = kept.clone();
    layers.push(block.start);
    layers.sort_unstable();
    let mut cut = keep_llama_layers(checkpoint, &layers)?;
    // Every layer before the block is kept, so the stand-in is layer `block.start` of the cut.
    cut.weights.extend(replacement.weights.clone());
    let record = surgery_record(
        a,
        total,
        &kept,
        reason,
        scores,
        Some(json!({"replacement": replacement, "options": opts})),
    )?;
    write_llama(&cut, &a.output, &[("surgery.json", record)])?;
    report(a, total, &kept);
    Ok(())
}

/// The removed layers (those not `kept` of `total`) as one contiguous block of at least two.
fn contiguous_block(total: usize, kept: &[usize]) -> CliResult<std::ops::Range<usize>> {
    let removed: Vec<usize> = (0..total).filter(|i| !kept.contains(i)).collect();
    match (removed.first(), removed.last()) {
        (Some(&first), Some(&last)) if last - first + 1 == removed.len() && removed.len() >= 2 => {
            Ok(first..last + 1)
        }
        _ => Err(format!(
            "--replace stands one layer in for a contiguous block of at least 2 removed layers; \
             these are not: {removed:?}"
        )
        .into()),
    }
}

/// `surgery.json`: where the model came from, what was kept and removed, and why.
fn surgery_record(
    a: &Args,
    total: usize,
    kept: &[usize],
    reason: serde_json::Value,
    scores: Option<ScoreReport>,
    replaced: Option<serde_json::Value>,
) -> CliResult<Vec<u8>> {
    let removed: Vec<usize> = (0..total).filter(|i| !kept.contains(i)).collect();
    let mut record = json!({
        "source": a.model.canonicalize().unwrap_or(a.model.clone()),
        "source_layers": total,
        "kept": kept,
        "removed": removed,
        "reason": reason,
        "scores": scores,
    });
    if let Some(replaced) = replaced {
        record["replaced"] = replaced;
    }
    Ok(serde_json::to_vec_pretty(&record)?)
}

fn report(a: &Args, total: usize, kept: &[usize]) {
    let removed: Vec<usize> = (0..total).filter(|i| !kept.contains(i)).collect();
    println!(
        "kept layers {kept:?} of {total}, removed {removed:?} -> {}",
        a.output.display()
    );
}
