//! Healing: retrain a cut student with AdamW, by distilling its teacher's sentence embeddings
//! or on a contrastive task, with checkpoints that resume bit-exactly.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use scalpel_autograd::optim::{clip_grad_norm, decays_by_default, Adam, AdamConfig, Schedule};
use scalpel_autograd::{ops, Params, Var};
use scalpel_models::bert::ForwardOptions;
use scalpel_models::sentence::SentenceEncoder;
use scalpel_models::tokenizer::Batch;
use scalpel_tensor::{DType, DeviceStats, Tensor};

use crate::checkpoint::write_staged;
use crate::data::PairFile;
use crate::eval::EvalReport;
use crate::teacher_targets::{TeacherTargets, TEACHER_TARGETS_FILE};
use crate::{Result, SurgeryError};

/// How student and teacher embeddings are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DistillLoss {
    /// Mean over batch and dimensions of `(s − t)²`.
    Mse,
    /// Mean over the batch of `1 − cos(s, t)`.
    Cosine,
}

/// What the student is trained on.
pub enum TrainingData {
    /// Distillation: the teacher's embedding of each sentence is the target.
    Sentences {
        sentences: Vec<String>,
        loss: DistillLoss,
    },
    /// Fine-tuning on positive pairs with in-batch negatives ([`contrastive_loss`]).
    Pairs(Vec<(String, String)>),
}

impl TrainingData {
    pub fn len(&self) -> usize {
        match self {
            TrainingData::Sentences { sentences, .. } => sentences.len(),
            TrainingData::Pairs(pairs) => pairs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long to train: the first limit reached ends the run.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    pub steps: Option<usize>,
    pub epochs: Option<usize>,
    pub minutes: Option<f64>,
}

impl Budget {
    /// The step count the run ends at, if the budget fixes one (the schedule's length). Without
    /// any limit a run is one epoch.
    pub fn total_steps(&self, batches_per_epoch: usize) -> Option<usize> {
        let by_epochs = self.epochs.map(|e| e * batches_per_epoch);
        match (self.steps, by_epochs, self.minutes) {
            (Some(s), Some(e), _) => Some(s.min(e)),
            (Some(s), None, _) | (None, Some(s), _) => Some(s),
            (None, None, Some(_)) => None,
            (None, None, None) => Some(batches_per_epoch),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct HealOptions {
    pub budget: Budget,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub dropout: f64,
    pub shuffle: bool,
    pub seed: u64,
    /// Name patterns of parameters to keep frozen (see [`matches_pattern`]).
    pub freeze: Vec<String>,
    #[serde(with = "schedule_name")]
    pub schedule: Schedule,
    pub warmup: usize,
    /// Clip the global gradient norm to this value.
    pub clip: Option<f64>,
    /// What the student's linear layers multiply in while training (absent in checkpoints from
    /// before it existed: f32). Encoders only so far.
    #[serde(default)]
    pub precision: Precision,
    /// Batch sentences of similar token counts (encoders, shuffled runs; see
    /// [`BatchOrder::grouped_by`]). Absent in checkpoints from before it existed: off.
    #[serde(default)]
    pub group_by_length: bool,
}

/// The arithmetic of a training step's GEMMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision (CPU only): the student's linear layers multiply bf16 copies of their
    /// f32 master weights, made again after each AdamW step, by activations rounded to bf16,
    /// with f32 accumulation (forward, input and weight gradients); AdamW and its moments, the
    /// loss, the biases, LayerNorm, attention and every reduction stay f32.
    Bf16,
}

impl Precision {
    /// The dtype the linear layers multiply in.
    pub fn linear_compute(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

impl HealOptions {
    /// The numeric options must be finite and in range. The CLI checks its flags as it parses
    /// them; this also covers a resumed run, whose options come from `trainer_state.json`.
    fn check_ranges(&self) -> Result<()> {
        let ranges = [
            ("--lr", self.lr, self.lr > 0.0, "greater than 0"),
            (
                "--weight-decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "at least 0",
            ),
            (
                "--dropout",
                self.dropout,
                (0.0..1.0).contains(&self.dropout),
                "in [0, 1)",
            ),
            (
                "--clip",
                self.clip.unwrap_or(1.0),
                self.clip.is_none_or(|c| c > 0.0),
                "greater than 0",
            ),
            (
                "--minutes",
                self.budget.minutes.unwrap_or(1.0),
                self.budget.minutes.is_none_or(|m| m > 0.0),
                "greater than 0",
            ),
        ];
        match ranges
            .iter()
            .find(|(_, value, in_range, _)| !(value.is_finite() && *in_range))
        {
            Some((flag, value, _, range)) => Err(SurgeryError::Invalid(format!(
                "{flag} {value} is out of range: it must be finite and {range}"
            ))),
            None => Ok(()),
        }
    }
}

mod schedule_name {
    use scalpel_autograd::optim::Schedule;

    pub fn serialize<S: serde::Serializer>(s: &Schedule, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(match s {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        })
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Schedule, D::Error> {
        match <String as serde::Deserialize>::deserialize(de)?.as_str() {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(serde::de::Error::custom(format!(
                "unknown schedule `{other}`"
            ))),
        }
    }
}

/// One line of the training log.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StepLog {
    pub step: usize,
    /// The batch's loss before this step's update.
    pub loss: f64,
    pub lr: f64,
    /// Seconds of training so far (across resumed runs).
    pub seconds: f64,
    /// What this step cost the device runtime (traffic, allocations, launches), on a device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceStats>,
}

/// `*` matches any run of characters; a pattern without `*` matches any name containing it.
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    if !pattern.contains('*') {
        return name.contains(pattern);
    }
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// The order in which examples are visited: epoch after epoch, each a permutation (seeded by
/// `seed` and the epoch) or file order.
pub struct BatchOrder {
    len: usize,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    /// Each example's token count, when batches group similar lengths.
    lengths: Option<Vec<usize>>,
}

/// Length grouping sorts windows of this many batches of the shuffled order. Over the 38,038 STS
/// 2012–2014 + SICK training sentences (mean 14.5 tokens) it brings the mean longest sentence of
/// a batch of 32, which every sentence of the batch is padded to, from 41.4 tokens to 15.2.
const GROUP_WINDOW_BATCHES: usize = 64;

impl BatchOrder {
    pub fn new(len: usize, batch_size: usize, shuffle: bool, seed: u64) -> BatchOrder {
        BatchOrder {
            len,
            batch_size,
            shuffle,
            seed,
            lengths: None,
        }
    }

    /// Batches of similar lengths, so little of a batch is padding: each epoch's shuffled order
    /// is cut into windows of [`GROUP_WINDOW_BATCHES`] batches, each window sorted by length
    /// and cut into batches, and the full batches are shuffled again (the short one stays
    /// last). Every example is still visited once an epoch. Without shuffling it changes nothing.
    pub fn grouped_by(self, lengths: Vec<usize>) -> BatchOrder {
        assert_eq!(lengths.len(), self.len, "one length per example");
        BatchOrder {
            lengths: Some(lengths),
            ..self
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    /// Example indices of 0-based batch `k`; the last batch of an epoch may be short.
    pub fn batch(&self, k: usize) -> Vec<usize> {
        let per_epoch = self.batches_per_epoch();
        let (epoch, within) = (k / per_epoch, k % per_epoch);
        let order = self.epoch_order(epoch as u64);
        let start = within * self.batch_size;
        order[start..(start + self.batch_size).min(self.len)].to_vec()
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if !self.shuffle {
            return order;
        }
        let stream = self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
        shuffle(&mut order, stream);
        let Some(lengths) = &self.lengths else {
            return order;
        };
        for window in order.chunks_mut(self.batch_size * GROUP_WINDOW_BATCHES) {
            window.sort_by_key(|&i| lengths[i]);
        }
        let full = self.len / self.batch_size;
        let mut batches: Vec<usize> = (0..full).collect();
        // A second stream of the same generator for the batches' order.
        shuffle(&mut batches, stream ^ 0x6A09_E667_F3BC_C908);
        let tail = &order[full * self.batch_size..];
        batches
            .iter()
            .flat_map(|&b| &order[b * self.batch_size..(b + 1) * self.batch_size])
            .chain(tail)
            .copied()
            .collect()
    }
}

/// Fisher–Yates driven by a counter-based generator (splitmix64): reproducible from `stream`.
fn shuffle(items: &mut [usize], stream: u64) {
    let mut state = stream;
    for i in (1..items.len()).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let j = ((z ^ (z >> 31)) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Refuses a teacher whose embeddings cannot be compared with the student's.
pub fn check_compatible(student: &SentenceEncoder, teacher: &SentenceEncoder) -> Result<()> {
    let (s, t) = (
        student.bert.config.hidden_size,
        teacher.bert.config.hidden_size,
    );
    if s != t {
        return Err(SurgeryError::Invalid(format!(
            "teacher hidden size {t} differs from the student's {s}"
        )));
    }
    if student.tokenizer.vocab() != teacher.tokenizer.vocab() {
        return Err(SurgeryError::Invalid(
            "teacher and student tokenizers differ (different vocabularies)".into(),
        ));
    }
    Ok(())
}

/// In-batch contrastive loss on positive pairs (sentence-transformers'
/// MultipleNegativesRankingLoss): row i of `anchors` should be most similar to row i of
/// `positives` among all rows; logits are `scale · cos`.
pub fn contrastive_loss(anchors: &Var, positives: &Var, scale: f64) -> Result<Var> {
    let a = ops::l2_normalize(anchors)?;
    let b = ops::l2_normalize(positives)?;
    let logits = ops::scale(&ops::matmul(&a, &b, false, true)?, scale)?;
    let targets: Vec<usize> = (0..anchors.shape()[0]).collect();
    Ok(ops::cross_entropy(&logits, &targets)?)
}

/// The similarity scale of [`contrastive_loss`], as sentence-transformers uses.
pub const CONTRASTIVE_SCALE: f64 = 20.0;

/// Files a training checkpoint holds besides the model.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_STATE_FILE: &str = "optimizer.safetensors";
pub const TRAINING_LOG_FILE: &str = "training_log.jsonl";

/// Everything besides weights and optimiser moments that continuing a run needs.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Steps completed.
    pub step: usize,
    /// Training seconds so far.
    pub seconds: f64,
    pub options: HealOptions,
    /// Number and fingerprint of the training examples: a resumed run must see the same data.
    pub examples: usize,
    pub data_fingerprint: u64,
    pub log: Vec<StepLog>,
    pub finished: bool,
    /// What the front end needs to restart the run (the CLI keeps its arguments here).
    pub invocation: serde_json::Value,
}

impl TrainerState {
    /// Reads the state of the checkpoint in `dir`.
    pub fn load(dir: &Path) -> Result<TrainerState> {
        let path = dir.join(TRAINER_STATE_FILE);
        let bytes = scalpel_models::read_limited(&path, scalpel_models::MAX_JSON_BYTES)
            .map_err(|e| SurgeryError::Invalid(format!("not a training checkpoint: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SurgeryError::Invalid(format!("{}: {e}", path.display())))
    }
}

/// What happened during a run, as it happens.
pub enum HealEvent<'a> {
    Step {
        log: &'a StepLog,
        /// The planned number of steps, when the budget fixes it.
        total: Option<usize>,
        sentences_per_second: f64,
    },
    Eval {
        step: usize,
        report: &'a EvalReport,
    },
    /// A decoder's perplexity on held-out text.
    Perplexity {
        step: usize,
        perplexity: f64,
    },
    Checkpoint {
        step: usize,
        dir: &'a Path,
    },
}

/// Where and how often a run saves itself.
pub struct Checkpointing<'a> {
    /// The checkpoint folder (a complete model plus trainer and optimiser state); the final
    /// model is written here too.
    pub dir: &'a Path,
    pub every: Option<usize>,
}

/// One training run.
pub struct HealRun<'a> {
    pub student: &'a mut SentenceEncoder,
    /// Required for distillation.
    pub teacher: Option<&'a SentenceEncoder>,
    pub data: &'a TrainingData,
    pub opts: &'a HealOptions,
    pub checkpoint: Option<Checkpointing<'a>>,
    pub eval: &'a [PairFile],
    pub eval_every: Option<usize>,
    /// Continue from this state; the student must hold the checkpoint's weights and the
    /// optimiser state is read from `resume_from`.
    pub resume: Option<(TrainerState, &'a Path)>,
    /// Set from outside (Ctrl-C) to stop after the current step and save a checkpoint.
    pub stop: Option<&'a AtomicBool>,
    pub invocation: serde_json::Value,
}

#[derive(Debug)]
pub struct HealOutcome {
    pub log: Vec<StepLog>,
    pub step: usize,
    pub interrupted: bool,
    pub last_eval: Option<EvalReport>,
}

/// FNV-1a over the examples: cheap and stable across runs.
fn fingerprint(data: &TrainingData) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |s: &str| {
        for b in s.bytes().chain([0xff]) {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    match data {
        TrainingData::Sentences { sentences, .. } => sentences.iter().for_each(|s| feed(s)),
        TrainingData::Pairs(pairs) => pairs.iter().for_each(|(a, b)| {
            feed(a);
            feed(b)
        }),
    }
    h
}

/// Each example's token count as the student's tokenizer cuts it (a pair's: the longer side's).
fn token_counts(student: &SentenceEncoder, data: &TrainingData) -> Result<Vec<usize>> {
    let count = |text: &str| -> Result<usize> { Ok(student.tokenizer.encode(text)?.len()) };
    match data {
        TrainingData::Sentences { sentences, .. } => sentences.iter().map(|s| count(s)).collect(),
        TrainingData::Pairs(pairs) => pairs
            .iter()
            .map(|(a, b)| Ok(count(a)?.max(count(b)?)))
            .collect(),
    }
}

/// The loss of one batch (before the update). Distillation reads the teacher's embeddings from
/// `targets` where given (computing only those never drawn before), else runs the teacher on the
/// whole batch.
fn batch_loss(
    student: &SentenceEncoder,
    teacher: Option<&SentenceEncoder>,
    targets: Option<&mut TeacherTargets>,
    data: &TrainingData,
    indices: &[usize],
    forward: &ForwardOptions,
) -> Result<Var> {
    let batch_of = |texts: Vec<&str>| -> Result<Batch> { Ok(student.tokenizer.batch(&texts)?) };
    match data {
        TrainingData::Sentences { sentences, loss } => {
            let teacher = teacher.ok_or_else(|| {
                SurgeryError::Invalid("distillation needs a teacher model".into())
            })?;
            // The mask goes to the device once, for both forwards.
            let batch = batch_of(indices.iter().map(|&i| sentences[i].as_str()).collect())?
                .placed(&student.bert.device())?;
            let teacher_embeds = |batch: &Batch| -> Result<Tensor> {
                Ok(teacher
                    .embed_batch(batch, &ForwardOptions::default())?
                    .value()
                    .clone())
            };
            let target = Var::constant(match targets {
                Some(targets) => targets.batch(indices, |new| {
                    // In the first epoch every sentence is new: the batch is already tokenized.
                    if new == indices {
                        return teacher_embeds(&batch);
                    }
                    teacher_embeds(&batch_of(
                        new.iter().map(|&i| sentences[i].as_str()).collect(),
                    )?)
                })?,
                None => teacher_embeds(&batch)?,
            });
            let prediction = student.embed_batch(&batch, forward)?;
            Ok(match loss {
                DistillLoss::Mse => ops::mse_loss(&prediction, &target)?,
                DistillLoss::Cosine => ops::cosine_loss(&prediction, &target)?,
            })
        }
        TrainingData::Pairs(pairs) => {
            let first = batch_of(indices.iter().map(|&i| pairs[i].0.as_str()).collect())?;
            let second = batch_of(indices.iter().map(|&i| pairs[i].1.as_str()).collect())?;
            let second_forward = ForwardOptions {
                seed: forward.seed ^ 0x5eed_f5ec_04d0,
                ..*forward
            };
            contrastive_loss(
                &student.embed_batch(&first, forward)?,
                &student.embed_batch(&second, &second_forward)?,
                CONTRASTIVE_SCALE,
            )
        }
    }
}

/// Checks the options of a run over `examples` training examples and returns the order their
/// batches are visited in and the planned number of steps (when the budget fixes one).
pub(crate) fn plan_run(opts: &HealOptions, examples: usize) -> Result<(BatchOrder, Option<usize>)> {
    if examples == 0 {
        return Err(SurgeryError::Invalid("no training examples".into()));
    }
    opts.check_ranges()?;
    if opts.batch_size == 0 || opts.budget.steps == Some(0) || opts.budget.epochs == Some(0) {
        return Err(SurgeryError::Invalid(
            "--steps, --epochs and --batch-size must be at least 1".into(),
        ));
    }
    let order = BatchOrder::new(examples, opts.batch_size, opts.shuffle, opts.seed);
    let total = opts.budget.total_steps(order.batches_per_epoch());
    if total.is_none() && opts.schedule != Schedule::Constant {
        return Err(SurgeryError::Invalid(
            "a decaying --schedule needs a fixed length: give --steps or --epochs".into(),
        ));
    }
    Ok((order, total))
}

/// Continues `state` from the checkpoint `saved` read from `dir`: the same data, the saved step,
/// time and log, and the optimiser's moments.
pub(crate) fn restore(
    state: &mut TrainerState,
    adam: &mut Adam,
    saved: TrainerState,
    dir: &Path,
) -> Result<()> {
    if (saved.examples, saved.data_fingerprint) != (state.examples, state.data_fingerprint) {
        return Err(SurgeryError::Invalid(format!(
            "{}: the checkpoint was trained on different data ({} examples) than given now ({})",
            dir.display(),
            saved.examples,
            state.examples
        )));
    }
    adam.load(&dir.join(OPTIMIZER_STATE_FILE))?;
    state.step = saved.step;
    state.seconds = saved.seconds;
    state.log = saved.log;
    Ok(())
}

/// Whether a run that has done `step` steps in `seconds` has spent its budget.
pub(crate) fn budget_spent(
    opts: &HealOptions,
    total: Option<usize>,
    step: usize,
    seconds: f64,
) -> bool {
    total.is_some_and(|t| step >= t) || opts.budget.minutes.is_some_and(|m| seconds >= m * 60.0)
}

/// One AdamW update of `params` (step `step`, counted from 1) from the batch's `loss`, clipped
/// and scheduled as `opts` says; returns the loss and the learning rate used. A NaN or infinite
/// loss or gradient norm is an error before any weight changes.
pub(crate) fn optimizer_step(
    loss: Var,
    params: &mut Params,
    adam: &mut Adam,
    opts: &HealOptions,
    step: usize,
    total: Option<usize>,
) -> Result<(f64, f64)> {
    let loss_value = loss.value().to_host()?.to_vec::<f64>()[0];
    if !loss_value.is_finite() {
        return Err(SurgeryError::Invalid(format!(
            "loss became {loss_value} at step {step}; stopped without saving (the last checkpoint is intact; try a lower --lr)"
        )));
    }
    let mut grads = loss.backward()?;
    // Release the graph so the optimiser updates the weights in place instead of copying.
    drop(loss);
    let norm = clip_grad_norm(&mut grads, params, opts.clip.unwrap_or(f64::INFINITY))?;
    if !norm.is_finite() {
        return Err(SurgeryError::Invalid(format!(
            "gradient norm became {norm} at step {step}; stopped without saving (the last checkpoint is intact; try a lower --lr or --clip)"
        )));
    }
    let lr = opts
        .schedule
        .lr(opts.lr, step, opts.warmup, total.unwrap_or(usize::MAX));
    adam.step(params, &grads, lr)?;
    Ok((loss_value, lr))
}

/// Writes what a checkpoint holds besides the model into `staging`: the optimiser's state, the
/// trainer state and the log.
pub(crate) fn write_trainer_files(staging: &Path, state: &TrainerState, adam: &Adam) -> Result<()> {
    adam.save(&staging.join(OPTIMIZER_STATE_FILE))?;
    let log = state
        .log
        .iter()
        .map(|l| serde_json::to_string(l).expect("a log line serialises") + "\n")
        .collect::<String>();
    let state_json = serde_json::to_vec_pretty(state).expect("trainer state serialises");
    for (name, bytes) in [
        (TRAINER_STATE_FILE, state_json),
        (TRAINING_LOG_FILE, log.into_bytes()),
    ] {
        let path = staging.join(name);
        std::fs::write(&path, bytes).map_err(crate::io_err(&path))?;
    }
    Ok(())
}

/// Trains the student until the budget is spent (or `stop` is set), evaluating and saving
/// checkpoints as asked. Deterministic given the options: a run resumed from a checkpoint
/// reproduces the uninterrupted run's losses exactly. A NaN or infinite loss or gradient stops
/// the run with an error before anything is written, so the last checkpoint stays good.
pub fn heal(
    run: HealRun,
    mut on_event: impl FnMut(HealEvent) -> Result<()>,
) -> Result<HealOutcome> {
    let HealRun {
        student,
        teacher,
        data,
        opts,
        checkpoint,
        eval,
        eval_every,
        resume,
        stop,
        invocation,
    } = run;
    if let Some(t) = teacher {
        check_compatible(student, t)?;
    }
    crate::eval::check_rankable(eval)?;
    if matches!(data, TrainingData::Pairs(_)) && opts.batch_size < 2 {
        return Err(SurgeryError::Invalid(
            "the contrastive loss needs --batch-size of at least 2 (in-batch negatives)".into(),
        ));
    }
    let (order, total) = plan_run(opts, data.len())?;
    let order = if opts.group_by_length {
        order.grouped_by(token_counts(student, data)?)
    } else {
        order
    };
    student
        .bert
        .params
        .unfreeze(|name| !opts.freeze.iter().any(|p| matches_pattern(p, name)));
    let mut adam = Adam::new(AdamConfig::adamw(opts.weight_decay), decays_by_default);
    let mut state = TrainerState {
        step: 0,
        seconds: 0.0,
        options: opts.clone(),
        examples: data.len(),
        data_fingerprint: fingerprint(data),
        log: Vec::new(),
        finished: false,
        invocation,
    };
    let device = student.bert.device();
    // On a device the teacher's forward stays there each step (only ids and mask travel);
    // on the CPU its embeddings are kept (see `teacher_targets`).
    let mut targets = match data {
        TrainingData::Sentences { sentences, .. } if device.is_cpu() => Some(TeacherTargets::new(
            sentences.len(),
            student.bert.config.hidden_size,
        )),
        _ => None,
    };
    if let Some((saved, dir)) = resume {
        restore(&mut state, &mut adam, saved, dir)?;
        // A checkpoint from before the targets were kept has none: they are computed again.
        let kept = dir.join(TEACHER_TARGETS_FILE);
        if let Some(t) = targets.as_mut().filter(|_| kept.exists()) {
            *t = TeacherTargets::load(&kept, data.len(), student.bert.config.hidden_size)?;
        }
    }
    let save = |state: &TrainerState,
                student: &SentenceEncoder,
                adam: &Adam,
                targets: Option<&TeacherTargets>|
     -> Result<()> {
        let Some(c) = &checkpoint else { return Ok(()) };
        write_staged(&student.bert, &student.dir, c.dir, |staging| {
            write_trainer_files(staging, state, adam)?;
            targets.map_or(Ok(()), |t| t.save(&staging.join(TEACHER_TARGETS_FILE)))
        })
    };
    let evaluate = |step: usize,
                    student: &SentenceEncoder,
                    on_event: &mut dyn FnMut(HealEvent) -> Result<()>|
     -> Result<Option<EvalReport>> {
        if eval.is_empty() {
            return Ok(None);
        }
        let report = crate::eval::evaluate(student, eval, None)?;
        on_event(HealEvent::Eval {
            step,
            report: &report,
        })?;
        Ok(Some(report))
    };

    let started = Instant::now();
    let prior_seconds = state.seconds;
    let mut interrupted = false;
    let mut last_eval = None;
    let sentences_per_example = if matches!(data, TrainingData::Pairs(_)) {
        2
    } else {
        1
    };
    let mut sentences_seen = 0usize;
    if let Some(t) = teacher {
        if t.bert.device() != device {
            return Err(SurgeryError::Invalid(format!(
                "the student is on {} but the teacher on {}",
                device.name(),
                t.bert.device().name()
            )));
        }
    }
    loop {
        let stats_before = device.stats();
        if budget_spent(
            opts,
            total,
            state.step,
            prior_seconds + started.elapsed().as_secs_f64(),
        ) {
            break;
        }
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            interrupted = true;
            break;
        }
        let step = state.step + 1;
        let indices = order.batch(step - 1);
        let forward = ForwardOptions {
            dropout: opts.dropout,
            seed: opts.seed.wrapping_add(step as u64),
        };
        // Only the step's own forward and backward: evaluations and the saved model are f32.
        student
            .bert
            .set_linear_compute(opts.precision.linear_compute())?;
        let stepped = batch_loss(student, teacher, targets.as_mut(), data, &indices, &forward)
            .and_then(|loss| {
                optimizer_step(loss, &mut student.bert.params, &mut adam, opts, step, total)
            });
        student.bert.set_linear_compute(DType::F32)?;
        let (loss_value, lr) = stepped?;
        sentences_seen += indices.len() * sentences_per_example;
        state.step = step;
        state.seconds = prior_seconds + started.elapsed().as_secs_f64();
        state.log.push(StepLog {
            step,
            loss: loss_value,
            lr,
            seconds: state.seconds,
            device: device
                .stats()
                .zip(stats_before)
                .map(|(now, was)| now.since(&was)),
        });
        on_event(HealEvent::Step {
            log: state.log.last().expect("just pushed"),
            total,
            sentences_per_second: sentences_seen as f64 / started.elapsed().as_secs_f64(),
        })?;
        if eval_every.is_some_and(|n| step.is_multiple_of(n)) {
            last_eval = evaluate(step, student, &mut on_event)?;
        }
        if let Some(c) = checkpoint
            .as_ref()
            .filter(|c| c.every.is_some_and(|n| step.is_multiple_of(n)))
        {
            save(&state, student, &adam, targets.as_ref())?;
            on_event(HealEvent::Checkpoint { step, dir: c.dir })?;
        }
    }
    if !interrupted
        && last_eval
            .as_ref()
            .is_none_or(|_| !eval_every.is_some_and(|n| state.step.is_multiple_of(n)))
    {
        last_eval = evaluate(state.step, student, &mut on_event)?;
    }
    state.finished = !interrupted;
    save(&state, student, &adam, targets.as_ref())?;
    if let Some(c) = &checkpoint {
        on_event(HealEvent::Checkpoint {
            step: state.step,
            dir: c.dir,
        })?;
    }
    student.bert.params.freeze(|_| true);
    Ok(HealOutcome {
        log: state.log,
        step: state.step,
        interrupted,
        last_eval,
    })
}
