//! Healing: distil a cut student towards its teacher's sentence embeddings with AdamW.

use std::time::Instant;

use scalpel_autograd::optim::{clip_grad_norm, decays_by_default, Adam, AdamConfig, Schedule};
use scalpel_autograd::{ops, Var};
use scalpel_models::bert::ForwardOptions;
use scalpel_models::sentence::SentenceEncoder;
use scalpel_models::tokenizer::Batch;

use crate::{Result, SurgeryError};

/// How student and teacher embeddings are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistillLoss {
    /// Mean over batch and dimensions of `(s − t)²`.
    Mse,
    /// Mean over the batch of `1 − cos(s, t)`.
    Cosine,
}

#[derive(Clone, Debug)]
pub struct HealOptions {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub loss: DistillLoss,
    pub dropout: f64,
    pub shuffle: bool,
    pub seed: u64,
    /// Name patterns of parameters to keep frozen (see [`matches_pattern`]).
    pub freeze: Vec<String>,
    pub schedule: Schedule,
    pub warmup: usize,
    /// Clip the global gradient norm to this value.
    pub clip: Option<f64>,
}

/// One line of the training log.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepLog {
    pub step: usize,
    /// The batch's loss before this step's update.
    pub loss: f64,
    pub lr: f64,
    /// Seconds since training started.
    pub seconds: f64,
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
}

impl BatchOrder {
    pub fn new(len: usize, batch_size: usize, shuffle: bool, seed: u64) -> BatchOrder {
        BatchOrder {
            len,
            batch_size,
            shuffle,
            seed,
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
        if self.shuffle {
            // Fisher–Yates driven by a counter-based generator: reproducible from (seed, epoch).
            let mut state = self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
            for i in (1..self.len).rev() {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                let j = ((z ^ (z >> 31)) % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        order
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

/// Trains `student` for `opts.steps` steps and returns the log. `on_step` sees each log line as
/// it happens (progress display, log file).
pub fn heal(
    student: &mut SentenceEncoder,
    teacher: &SentenceEncoder,
    sentences: &[String],
    opts: &HealOptions,
    mut on_step: impl FnMut(&StepLog) -> Result<()>,
) -> Result<Vec<StepLog>> {
    check_compatible(student, teacher)?;
    if opts.batch_size == 0 || opts.steps == 0 {
        return Err(SurgeryError::Invalid(
            "--steps and --batch-size must be at least 1".into(),
        ));
    }
    student
        .bert
        .params
        .unfreeze(|name| !opts.freeze.iter().any(|p| matches_pattern(p, name)));
    let mut adam = Adam::new(AdamConfig::adamw(opts.weight_decay), decays_by_default);
    let order = BatchOrder::new(sentences.len(), opts.batch_size, opts.shuffle, opts.seed);
    let started = Instant::now();
    let mut log = Vec::with_capacity(opts.steps);
    for step in 1..=opts.steps {
        let ids = order
            .batch(step - 1)
            .iter()
            .map(|&i| student.tokenizer.encode(&sentences[i]))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = Batch::from_ids(&ids);
        let target = Var::constant(
            teacher
                .embed_batch(&batch, &ForwardOptions::default())?
                .value()
                .clone(),
        );
        let forward = ForwardOptions {
            dropout: opts.dropout,
            seed: opts.seed.wrapping_add(step as u64),
        };
        let prediction = student.embed_batch(&batch, &forward)?;
        let loss = match opts.loss {
            DistillLoss::Mse => ops::mse_loss(&prediction, &target)?,
            DistillLoss::Cosine => ops::cosine_loss(&prediction, &target)?,
        };
        let loss_value = loss.value().to_vec::<f64>()[0];
        if !loss_value.is_finite() {
            return Err(SurgeryError::Invalid(format!(
                "loss became {loss_value} at step {step}; stopping (try a lower --lr)"
            )));
        }
        let mut grads = loss.backward()?;
        // Release the graph so the optimiser updates the weights in place instead of copying.
        drop((loss, prediction));
        if let Some(max_norm) = opts.clip {
            clip_grad_norm(&mut grads, &student.bert.params, max_norm)?;
        }
        let lr = opts.schedule.lr(opts.lr, step, opts.warmup, opts.steps);
        adam.step(&mut student.bert.params, &grads, lr)?;
        let entry = StepLog {
            step,
            loss: loss_value,
            lr,
            seconds: started.elapsed().as_secs_f64(),
        };
        on_step(&entry)?;
        log.push(entry);
    }
    student.bert.params.freeze(|_| true);
    Ok(log)
}
