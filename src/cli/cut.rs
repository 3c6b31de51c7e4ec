use std::path::PathBuf;

use scalpel::models::bert::Bert;
use scalpel::models::llama::LlamaCheckpoint;
use scalpel::surgery::checkpoint::{check_output, write_llama, write_model};
use scalpel::surgery::cut::{keep_layers, keep_llama_layers, parse_layer_list, LayerSelection};
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
}

impl Args {
    pub fn model(&self) -> &std::path::Path {
        &self.model
    }

    /// Only `--auto` runs the model (to score its layers).
    pub fn computes(&self) -> bool {
        self.auto.is_some()
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
    let bert = Bert::load(&a.model)?;
    let total = bert.num_layers();
    let (kept, reason, scores) = match explicit {
        Some(selection) => (selection.kept(total)?, json!(selection), None),
        None => {
            let (keep, reason, report) = auto_selection(&a, OneMetric::DropLoss)?;
            (keep, reason, Some(report))
        }
    };
    let cut = keep_layers(&bert, &kept)?;
    let record = surgery_record(&a, total, &kept, reason, scores)?;
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

/// `--auto`'s choice: the layers `metric` (or `--metric`) keeps, why, and the scores.
fn auto_selection(
    a: &Args,
    default: OneMetric,
) -> CliResult<(Vec<usize>, serde_json::Value, ScoreReport)> {
    let k = a.auto.expect("only called for --auto");
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

/// A Llama-family decoder (GGUF or folder) cut to an explicit or scored selection, written as
/// a Hugging Face folder.
fn cut_decoder(a: &Args, explicit: Option<LayerSelection>) -> CliResult {
    check_output(&a.model, &a.output, a.force)?;
    let checkpoint = LlamaCheckpoint::load(&a.model)?;
    let total = checkpoint.config.num_hidden_layers;
    let (kept, reason, scores) = match explicit {
        Some(selection) => (selection.kept(total)?, json!(selection), None),
        None => {
            let (keep, reason, report) = auto_selection(a, OneMetric::DropPpl)?;
            (keep, reason, Some(report))
        }
    };
    let record = surgery_record(a, total, &kept, reason, scores)?;
    let cut = keep_llama_layers(checkpoint, &kept)?;
    write_llama(&cut, &a.output, &[("surgery.json", record)])?;
    report(a, total, &kept);
    Ok(())
}

/// `surgery.json`: where the model came from, what was kept and removed, and why.
fn surgery_record(
    a: &Args,
    total: usize,
    kept: &[usize],
    reason: serde_json::Value,
    scores: Option<ScoreReport>,
) -> CliResult<Vec<u8>> {
    let removed: Vec<usize> = (0..total).filter(|i| !kept.contains(i)).collect();
    let record = json!({
        "source": a.model.canonicalize().unwrap_or(a.model.clone()),
        "source_layers": total,
        "kept": kept,
        "removed": removed,
        "reason": reason,
        "scores": scores,
    });
    Ok(serde_json::to_vec_pretty(&record)?)
}

fn report(a: &Args, total: usize, kept: &[usize]) {
    let removed: Vec<usize> = (0..total).filter(|i| !kept.contains(i)).collect();
    println!(
        "kept layers {kept:?} of {total}, removed {removed:?} -> {}",
        a.output.display()
    );
}
