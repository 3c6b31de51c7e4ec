use std::path::PathBuf;

use scalpel::surgery::checkpoint::check_output;
use scalpel::surgery::data::read_pairs;
use scalpel::surgery::head::{train_new_head, write_head_model, NewHeadOptions};

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// The encoder to put the head on; never modified.
    #[arg(long)]
    model: PathBuf,
    /// Labelled sentence pairs to train on (SICK TSV: the entailment_judgment column is the label).
    #[arg(long)]
    train: PathBuf,
    /// Labelled sentence pairs to report accuracy on, before and after training.
    #[arg(long)]
    eval: PathBuf,
    /// Number of classes; must equal the distinct labels of --train.
    #[arg(long, value_parser = flags::positive)]
    labels: usize,
    /// Where the model folder with head.safetensors and head.json is written.
    #[arg(long)]
    output: PathBuf,
    /// Train only the head (embeddings are computed once).
    #[arg(long)]
    freeze_backbone: bool,
    #[arg(long, default_value_t = 10, value_parser = flags::positive)]
    epochs: usize,
    #[arg(long, default_value_t = 32, value_parser = flags::positive)]
    batch_size: usize,
    /// Learning rate of the head.
    #[arg(long, default_value_t = 2e-3, value_parser = flags::finite_positive)]
    lr: f64,
    /// Learning rate of the encoder (without --freeze-backbone).
    #[arg(long, default_value_t = 2e-5, value_parser = flags::finite_positive)]
    backbone_lr: f64,
    #[arg(long, default_value_t = 0.01, value_parser = flags::finite_non_negative)]
    weight_decay: f64,
    /// Seeds the head's initialisation and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> CliResult {
    check_output(&a.model, &a.output, a.force)?;
    let train = read_pairs(&a.train)?;
    let eval = read_pairs(&a.eval)?;
    let mut encoder = super::load_encoder(&a.model)?;
    let opts = NewHeadOptions {
        labels: a.labels,
        freeze_backbone: a.freeze_backbone,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        backbone_lr: a.backbone_lr,
        weight_decay: a.weight_decay,
        seed: a.seed,
    };
    let (head, report) = train_new_head(&mut encoder, &train, &eval, &opts, |line| {
        eprintln!("{line}")
    })?;
    write_head_model(&encoder, &head, &report, &a.model, &a.output, a.force)?;
    println!(
        "accuracy on {}: before {:.4}, after {:.4} (majority class {:.4}); labels {}",
        a.eval.display(),
        report.accuracy_before,
        report.accuracy_after,
        report.majority_rate,
        report.labels.join(", ")
    );
    println!("model with new head -> {}", a.output.display());
    Ok(())
}
