use std::io::Write;
use std::path::PathBuf;

use clap::ValueEnum;
use scalpel::autograd::optim::Schedule;
use scalpel::models::sentence::SentenceEncoder;
use scalpel::surgery::checkpoint::{check_output, write_model};
use scalpel::surgery::data::read_sentences;
use scalpel::surgery::heal::{heal, DistillLoss, HealOptions};

use super::CliResult;

#[derive(Clone, Copy, ValueEnum)]
enum LossArg {
    Mse,
    Cosine,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

#[derive(clap::Args)]
pub struct Args {
    /// The model to train (e.g. the output of `scalpel cut`); never modified.
    #[arg(long)]
    student: PathBuf,
    /// The reference model whose sentence embeddings the student learns to reproduce.
    #[arg(long)]
    teacher: PathBuf,
    /// Text file, one sentence per line.
    #[arg(long)]
    data: PathBuf,
    /// Where the healed model is written.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, value_enum, default_value_t = LossArg::Mse)]
    loss: LossArg,
    /// Hidden dropout probability during training.
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Visit the data in file order instead of a seeded shuffle.
    #[arg(long)]
    no_shuffle: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep parameters matching this pattern frozen (`*` wildcard; otherwise substring). Repeatable.
    #[arg(long)]
    freeze: Vec<String>,
    /// Freeze whole encoder layers, e.g. `0-1`.
    #[arg(long)]
    freeze_layers: Option<String>,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Constant)]
    schedule: ScheduleArg,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    clip: Option<f64>,
    /// Also write the training log (JSON lines) here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> CliResult {
    check_output(&a.student, &a.output, a.force)?;
    let sentences = read_sentences(&a.data)?;
    let mut student = SentenceEncoder::load(&a.student)?;
    let teacher = SentenceEncoder::load(&a.teacher)?;
    let mut freeze = a.freeze.clone();
    if let Some(layers) = &a.freeze_layers {
        for l in scalpel::surgery::cut::parse_layer_list(layers)? {
            freeze.push(format!("encoder.layer.{l}."));
        }
    }
    let opts = HealOptions {
        steps: a.steps,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        loss: match a.loss {
            LossArg::Mse => DistillLoss::Mse,
            LossArg::Cosine => DistillLoss::Cosine,
        },
        dropout: a.dropout,
        shuffle: !a.no_shuffle,
        seed: a.seed,
        freeze,
        schedule: match a.schedule {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Linear => Schedule::Linear,
            ScheduleArg::Cosine => Schedule::Cosine,
        },
        warmup: a.warmup,
        clip: a.clip,
    };
    let mut log_lines = String::new();
    let log = heal(&mut student, &teacher, &sentences, &opts, |entry| {
        eprintln!(
            "step {:>5}/{}  loss {:.6e}  lr {:.2e}  {:.1} s",
            entry.step, a.steps, entry.loss, entry.lr, entry.seconds
        );
        Ok(())
    })?;
    for entry in &log {
        log_lines.push_str(&serde_json::to_string(entry)?);
        log_lines.push('\n');
    }
    if let Some(path) = &a.log {
        let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(log_lines.as_bytes())?;
    }
    write_model(
        &student.bert,
        &a.student,
        &a.output,
        a.force,
        &[("training_log.jsonl", log_lines.into_bytes())],
    )?;
    println!("healed model -> {}", a.output.display());
    Ok(())
}
