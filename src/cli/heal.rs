use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use scalpel::autograd::optim::Schedule;
use scalpel::surgery::checkpoint::check_output;
use scalpel::surgery::data::{read_pairs, read_positive_pairs, read_training_text, PairFile};
use scalpel::surgery::heal::{
    heal, Budget, Checkpointing, DistillLoss, HealEvent, HealOptions, HealOutcome, HealRun,
    Precision, TrainerState, TrainingData,
};
use serde::{Deserialize, Serialize};

use super::{flags, CliResult};

#[path = "heal_decoder.rs"]
mod decoder;

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize)]
enum LossArg {
    Mse,
    Cosine,
    /// In-batch contrastive loss on positive pairs (needs STS/SICK pair files as --data).
    Contrastive,
}

#[derive(Clone, Copy, Default, PartialEq, ValueEnum, Serialize, Deserialize)]
enum PrecisionArg {
    #[default]
    F32,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum, Serialize, Deserialize)]
enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

/// The arguments that define a run; saved in each checkpoint so `--resume DIR` alone continues it.
#[derive(clap::Args, Serialize, Deserialize)]
pub struct Args {
    /// The model to train (e.g. the output of `scalpel cut`); never modified.
    #[arg(long, required_unless_present = "resume")]
    student: Option<PathBuf>,
    /// The reference model whose sentence embeddings the student learns to reproduce (needed
    /// for the mse and cosine losses).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Training data: a text file with one sentence per line, or STS (.tsv) / SICK pair files
    /// (both sentences of each pair are used). Several files: `--data a b` or repeated flags.
    #[arg(long, required_unless_present = "resume", num_args = 1..)]
    data: Vec<PathBuf>,
    /// Where the healed model (and every checkpoint) is written.
    #[arg(long, required_unless_present = "resume")]
    output: Option<PathBuf>,
    /// Stop after this many steps.
    #[arg(long, value_parser = flags::positive)]
    steps: Option<usize>,
    /// Stop after this many passes over the data (one pass if no limit is given at all).
    #[arg(long, value_parser = flags::positive)]
    epochs: Option<usize>,
    /// Stop after this many minutes of training.
    #[arg(long, value_parser = flags::finite_positive)]
    minutes: Option<f64>,
    /// Examples per optimisation step (sentences for distillation, pairs for contrastive).
    #[arg(long, default_value_t = 32, value_parser = flags::positive)]
    batch_size: usize,
    /// Peak learning rate of AdamW (after --warmup, before the --schedule's decay).
    #[arg(long, default_value_t = 1e-4, value_parser = flags::finite_positive)]
    lr: f64,
    /// AdamW's decoupled weight decay (never applied to biases and LayerNorm parameters).
    #[arg(long, default_value_t = 0.01, value_parser = flags::finite_non_negative)]
    weight_decay: f64,
    /// Encoders: how the student is compared with the teacher, or contrastive fine-tuning
    /// [default: mse].
    #[arg(long, value_enum)]
    loss: Option<LossArg>,
    /// Hidden dropout probability during training.
    #[arg(long, default_value_t = 0.0, value_parser = flags::probability)]
    dropout: f64,
    /// Visit the data in file order instead of a seeded shuffle.
    #[arg(long)]
    no_shuffle: bool,
    /// Encoders: batch sentences of similar token counts, so batches carry little padding
    /// (windows of 64 shuffled batches sorted by length, the batches shuffled again).
    #[arg(long, conflicts_with = "no_shuffle")]
    group_by_length: bool,
    /// Seeds the data order and the dropout masks: a run is a function of its options and data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep parameters matching this pattern frozen (`*` wildcard; otherwise substring). Repeatable.
    #[arg(long)]
    freeze: Vec<String>,
    /// Freeze whole layers (encoder or decoder), e.g. `0-1`.
    #[arg(long)]
    freeze_layers: Option<String>,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Constant)]
    schedule: ScheduleArg,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Clip the global gradient norm to this value.
    #[arg(long, value_parser = flags::finite_positive)]
    clip: Option<f64>,
    /// `bf16`: mixed precision on the CPU (bf16 GEMMs with f32 accumulation over f32 master
    /// weights, re-rounded after each step; AdamW, the loss and every reduction in f32); the
    /// teacher's forward then multiplies in bf16 too. Saved checkpoints are f32 either way.
    /// Encoders only so far.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    #[serde(default)]
    precision: PrecisionArg,
    /// Held-out files to evaluate on: STS/SICK files for an encoder (Spearman ×100), running
    /// text for a decoder (perplexity in windows of --eval-context tokens). `--eval a b` or
    /// repeated flags.
    #[arg(long, num_args = 1..)]
    eval: Vec<PathBuf>,
    /// Evaluate every N steps (and always at the end).
    #[arg(long, value_parser = flags::positive)]
    eval_every: Option<usize>,
    /// Save a checkpoint to --output every N steps (atomically: a complete model plus optimiser
    /// and trainer state).
    #[arg(long, value_parser = flags::positive)]
    checkpoint_every: Option<usize>,
    /// Continue the run saved in this checkpoint folder, exactly as if it had not stopped.
    #[arg(long)]
    #[serde(skip)]
    resume: Option<PathBuf>,
    /// Also write the training log (JSON lines) here.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Replace an existing output directory.
    #[arg(long)]
    #[serde(skip)]
    force: bool,
    /// Decoders: tokens per training window (the text is tokenized as one stream and cut into
    /// consecutive windows) [default: 128].
    #[arg(long, value_parser = flags::positive)]
    window_tokens: Option<usize>,
    /// Decoders: temperature T of the distillation loss T²·KL(teacher ‖ student) [default: 1].
    #[arg(long, value_parser = flags::finite_positive)]
    temperature: Option<f64>,
    /// Decoders: weight w of the next-token cross-entropy on the text; the loss is
    /// (1 − w)·T²·KL + w·CE, and w = 1 needs no teacher [default: 0].
    #[arg(long, value_parser = flags::finite_non_negative)]
    lm_weight: Option<f64>,
    /// Decoders: tokens per window of the held-out perplexity (--eval) [default: 512].
    #[arg(long, value_parser = flags::positive)]
    eval_context: Option<usize>,
}

impl Args {
    /// Whether the model to train (or the checkpoint to resume) is a Llama decoder.
    pub fn runs_decoder(&self) -> bool {
        self.student
            .as_deref()
            .or(self.resume.as_deref())
            .is_some_and(super::is_decoder)
    }

    /// The arguments that only decoders take, by flag, if any was given.
    fn decoder_flags(&self) -> Option<&'static str> {
        [
            (self.window_tokens.is_some(), "--window-tokens"),
            (self.temperature.is_some(), "--temperature"),
            (self.lm_weight.is_some(), "--lm-weight"),
            (self.eval_context.is_some(), "--eval-context"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

pub fn run(a: Args) -> CliResult {
    let (a, student_dir, saved) = match &a.resume {
        None => {
            let student = a.student.clone().expect("clap requires --student");
            let output = a.output.as_deref().expect("clap requires --output");
            check_output(&student, output, a.force)?;
            (a, student, None)
        }
        Some(dir) => {
            let saved = TrainerState::load(dir)?;
            if saved.finished {
                return Err(format!("{}: this run already finished", dir.display()).into());
            }
            let mut args: Args = serde_json::from_value(saved.invocation.clone())
                .map_err(|e| format!("{}: unreadable saved arguments: {e}", dir.display()))?;
            // Where the run continues: its own checkpoint folder unless told otherwise.
            if let Some(output) = &a.output {
                if output != dir {
                    check_output(dir, output, a.force)?;
                }
                args.output = Some(output.clone());
            }
            // A new time or step limit extends (or shortens) the run; nothing else may change.
            if a.steps.is_some() || a.epochs.is_some() || a.minutes.is_some() {
                (args.steps, args.epochs, args.minutes) = (a.steps, a.epochs, a.minutes);
            }
            args.resume = Some(dir.clone());
            (args, dir.clone(), Some(saved))
        }
    };
    let output = a.output.clone().expect("set above");
    if super::is_decoder(&student_dir) {
        if a.precision == PrecisionArg::Bf16 {
            return Err(
                "--precision bf16 heals encoders only so far (this is a Llama decoder)".into(),
            );
        }
        if a.group_by_length {
            return Err(
                "--group-by-length is for encoders: a decoder's windows all have the same length"
                    .into(),
            );
        }
        return decoder::run(a, student_dir, output, saved);
    }
    if let Some(flag) = a.decoder_flags() {
        return Err(format!(
            "{flag} is for Llama decoders; {} is an encoder",
            student_dir.display()
        )
        .into());
    }
    let loss = a.loss.unwrap_or(LossArg::Mse);
    let data = match loss {
        LossArg::Contrastive => TrainingData::Pairs(read_positive_pairs(&a.data)?),
        LossArg::Mse | LossArg::Cosine => TrainingData::Sentences {
            sentences: read_training_text(&a.data)?,
            loss: if matches!(loss, LossArg::Mse) {
                DistillLoss::Mse
            } else {
                DistillLoss::Cosine
            },
        },
    };
    let eval: Vec<PairFile> = a
        .eval
        .iter()
        .map(|p| read_pairs(p))
        .collect::<Result<_, _>>()?;
    let mut student = super::load_encoder(&student_dir)?;
    let teacher = match (&a.teacher, &data) {
        (Some(t), _) => {
            let mut teacher = super::load_encoder(t)?;
            if a.precision == PrecisionArg::Bf16 {
                teacher
                    .bert
                    .set_linear_compute(scalpel::tensor::DType::BF16)?;
            }
            Some(teacher)
        }
        (None, TrainingData::Sentences { .. }) => {
            return Err("--teacher is required for the mse and cosine (distillation) losses".into())
        }
        (None, TrainingData::Pairs(_)) => None,
    };
    let opts = options(&a, "encoder.layer.")?;
    let stop = stop_on_ctrl_c()?;
    let mut progress = Progress::new(&student_dir, &output, "sentences");
    let outcome = heal(
        HealRun {
            student: &mut student,
            teacher: teacher.as_ref(),
            data: &data,
            opts: &opts,
            checkpoint: Some(Checkpointing {
                dir: &output,
                every: a.checkpoint_every,
            }),
            eval: &eval,
            eval_every: a.eval_every,
            resume: saved.map(|s| (s, student_dir.as_path())),
            stop: Some(&stop),
            invocation: serde_json::to_value(&a)?,
        },
        |event| {
            progress.show(&event);
            Ok(())
        },
    )?;
    progress.finish();
    finish(&a, &outcome, &student_dir, &output)
}

/// The run's options from its flags; `--freeze-layers` names layers under `layer_prefix`.
fn options(a: &Args, layer_prefix: &str) -> CliResult<HealOptions> {
    let mut freeze = a.freeze.clone();
    if let Some(layers) = &a.freeze_layers {
        for l in scalpel::surgery::cut::parse_layer_list(layers)? {
            freeze.push(format!("{layer_prefix}{l}."));
        }
    }
    Ok(HealOptions {
        budget: Budget {
            steps: a.steps,
            epochs: a.epochs,
            minutes: a.minutes,
        },
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
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
        precision: match a.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        },
        group_by_length: a.group_by_length,
    })
}

/// A flag set by Ctrl-C: the run finishes its step and saves a checkpoint.
fn stop_on_ctrl_c() -> CliResult<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // A second Ctrl-C while the checkpoint is being written: give up at once.
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort)"
        );
    })?;
    Ok(stop)
}

/// Writes the log (`--log`) and says where the model went; an interrupted run exits with 130.
fn finish(a: &Args, outcome: &HealOutcome, student_dir: &Path, output: &Path) -> CliResult {
    if let Some(path) = &a.log {
        let lines: String = outcome
            .log
            .iter()
            .map(|l| serde_json::to_string(l).map(|s| s + "\n"))
            .collect::<Result<_, _>>()?;
        super::write_atomically(path, lines.as_bytes(), &[student_dir])?;
    }
    if outcome.interrupted {
        eprintln!(
            "stopped at step {}: checkpoint in {}; continue with `scalpel heal --resume {}`",
            outcome.step,
            output.display(),
            output.display()
        );
        std::process::exit(130);
    }
    println!(
        "healed model ({} steps) -> {}",
        outcome.step,
        output.display()
    );
    Ok(())
}

/// A progress bar on a terminal; plain lines (at most one every few seconds) otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    /// What the examples are, for the speed.
    unit: &'static str,
}

impl Progress {
    fn new(student: &Path, output: &Path, unit: &'static str) -> Progress {
        eprintln!("healing {} -> {}", student.display(), output.display());
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len}  {msg}  elapsed {elapsed_precise}  eta {eta}",
                )
                .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Progress {
            bar,
            last_line: None,
            unit,
        }
    }

    fn show(&mut self, event: &HealEvent) {
        match event {
            HealEvent::Step {
                log,
                total,
                sentences_per_second,
            } => {
                let msg = format!(
                    "loss {:.5e}  lr {:.2e}  {sentences_per_second:.1} {}/s",
                    log.loss, log.lr, self.unit
                );
                if let Some(bar) = &self.bar {
                    bar.set_length(total.unwrap_or(log.step + 1) as u64);
                    bar.set_position(log.step as u64);
                    bar.set_message(msg);
                } else if self
                    .last_line
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
                    || Some(log.step) == *total
                {
                    let of = total.map_or(String::new(), |t| format!("/{t}"));
                    eprintln!("step {}{of}  {msg}  {:.0} s", log.step, log.seconds);
                    self.last_line = Some(Instant::now());
                }
            }
            HealEvent::Eval { step, report } => self.line(format!(
                "eval at step {step}: mean Spearman {:.2} over {} files",
                report.mean_spearman,
                report.files.len()
            )),
            HealEvent::Perplexity { step, perplexity } => self.line(format!(
                "held-out perplexity at step {step}: {perplexity:.4}"
            )),
            HealEvent::Checkpoint { step, dir } => {
                self.line(format!("checkpoint at step {step} -> {}", dir.display()))
            }
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
