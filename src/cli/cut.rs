use std::path::PathBuf;

use scalpel::models::bert::Bert;
use scalpel::surgery::checkpoint::{check_output, write_model};
use scalpel::surgery::cut::{keep_layers, parse_layer_list, LayerSelection};
use serde_json::json;

use super::CliResult;

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
    #[arg(long)]
    truncate: Option<usize>,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> CliResult {
    let selection = match (&a.drop, &a.keep, a.truncate) {
        (Some(d), None, None) => LayerSelection::Drop(parse_layer_list(d)?),
        (None, Some(k), None) => LayerSelection::Keep(parse_layer_list(k)?),
        (None, None, Some(k)) => LayerSelection::Truncate(k),
        _ => {
            return Err(
                "say which layers to remove with exactly one of --drop, --keep or --truncate"
                    .into(),
            )
        }
    };
    check_output(&a.model, &a.output, a.force)?;
    let bert = Bert::load(&a.model)?;
    let total = bert.num_layers();
    let kept = selection.kept(total)?;
    let removed: Vec<usize> = (0..total).filter(|i| !kept.contains(i)).collect();
    let cut = keep_layers(&bert, &kept)?;
    let record = json!({
        "source": a.model.canonicalize().unwrap_or(a.model.clone()),
        "source_layers": total,
        "kept": kept,
        "removed": removed,
        "reason": format!("{selection:?}"),
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
