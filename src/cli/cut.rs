use std::path::PathBuf;

use scalpel::models::bert::Bert;
use scalpel::surgery::checkpoint::{check_output, write_model};
use scalpel::surgery::cut::{keep_layers, parse_layer_list, LayerSelection};
use serde_json::json;

use super::score::{MetricArg, OneMetric, Scoring};
use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Input model directory (never modified).
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
    /// The metric `--auto` ranks layers by.
    #[arg(long, value_enum, default_value_t = OneMetric::DropLoss)]
    metric: OneMetric,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

impl Args {
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
    let bert = Bert::load(&a.model)?;
    let total = bert.num_layers();
    let (kept, reason, scores) = match explicit {
        Some(selection) => (selection.kept(total)?, json!(selection), None),
        None => {
            let k = a.auto.expect("matched above");
            let report = a.scoring.run(&a.model, MetricArg::One(a.metric), Some(k))?;
            let scores = &report.metrics[0];
            let keep = scores.keep.clone().expect("a target was given");
            print!("{}", report.to_table());
            let reason = json!({"auto": {"keep": k, "metric": scores.metric.name()}});
            (keep, reason, Some(report))
        }
    };
    let removed: Vec<usize> = (0..total).filter(|i| !kept.contains(i)).collect();
    let cut = keep_layers(&bert, &kept)?;
    let record = json!({
        "source": a.model.canonicalize().unwrap_or(a.model.clone()),
        "source_layers": total,
        "kept": kept,
        "removed": removed,
        "reason": reason,
        "scores": scores,
    });
    let record = serde_json::to_vec_pretty(&record)?;
    write_model(
        &cut,
        &a.model,
        &a.output,
        a.force,
        &[("surgery.json", record)],
    )?;
    println!(
        "kept layers {kept:?} of {total}, removed {removed:?} -> {}",
        a.output.display()
    );
    Ok(())
}
