//! Healing a cut Llama decoder: the student learns the teacher's next-token distribution
//! (`T²·KL` at a temperature, [`ops::distill_kl`]), optionally mixed with the next-token
//! cross-entropy of the text itself, on fixed-length windows of running text. The optimiser,
//! schedule, budget, resume and checkpoint files are the encoder heal's ([`crate::heal`]); the
//! checkpoint's model is a Hugging Face `LlamaForCausalLM` folder.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use scalpel_autograd::optim::{Adam, AdamConfig};
use scalpel_autograd::{ops, Var};
use scalpel_models::llama::perplexity::perplexity;
use scalpel_models::llama::{Llama, LlamaCheckpoint};

use crate::checkpoint::write_folder;
use crate::heal::{
    budget_spent, matches_pattern, optimizer_step, plan_run, restore, write_trainer_files,
    Checkpointing, HealEvent, HealOptions, HealOutcome, StepLog, TrainerState,
};
use crate::{Result, SurgeryError};

/// Training examples: consecutive windows of running text, each `window_tokens + 1` ids long
/// (the model reads the first `window_tokens`, and each position predicts the next id), one
/// window starting every `window_tokens` ids so that every token but the first is predicted
/// exactly once per epoch.
pub struct DecoderData {
    pub window_tokens: usize,
    pub windows: Vec<Vec<u32>>,
}

impl DecoderData {
    pub fn from_ids(ids: &[u32], window_tokens: usize) -> Result<DecoderData> {
        let count = ids.len().saturating_sub(1) / window_tokens.max(1);
        if window_tokens < 2 || count == 0 {
            return Err(SurgeryError::Invalid(format!(
                "the training text has {} tokens: not one window of {window_tokens} (at least 2) \
                 plus the token it predicts",
                ids.len()
            )));
        }
        let windows = (0..count)
            .map(|w| ids[w * window_tokens..(w + 1) * window_tokens + 1].to_vec())
            .collect();
        Ok(DecoderData {
            window_tokens,
            windows,
        })
    }

    /// FNV-1a over the windows: a resumed run must see the same ones.
    fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for id in self.windows.iter().flatten() {
            for b in id.to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        h
    }
}

/// What a decoder learns from: `(1 − lm_weight)·T²·KL(teacher ‖ student) + lm_weight·CE`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecoderLoss {
    pub temperature: f64,
    /// 0: distillation only; 1: the text's next tokens only (no teacher needed).
    pub lm_weight: f64,
}

impl DecoderLoss {
    fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(SurgeryError::Invalid(format!(
                "--temperature {} is out of range: it must be finite and greater than 0",
                self.temperature
            )));
        }
        if !(0.0..=1.0).contains(&self.lm_weight) {
            return Err(SurgeryError::Invalid(format!(
                "--lm-weight {} is out of range: it must be in [0, 1]",
                self.lm_weight
            )));
        }
        Ok(())
    }

    fn distils(&self) -> bool {
        self.lm_weight < 1.0
    }
}

/// Held-out text: perplexity in non-overlapping windows of `context` tokens.
pub struct HeldOut {
    pub ids: Vec<u32>,
    pub context: usize,
}

impl HeldOut {
    /// The perplexity of `model` on the held-out text.
    pub fn perplexity(&self, model: &Llama) -> Result<f64> {
        Ok(perplexity(model, &self.ids, self.context, self.context)?.perplexity)
    }
}

/// One decoder training run (the decoder twin of [`crate::heal::HealRun`]).
pub struct DecoderHealRun<'a> {
    pub student: &'a mut Llama,
    /// The student's tokenizer, its config and the files written beside the weights
    /// (`weights` empty: the values come from `student`).
    pub files: &'a mut LlamaCheckpoint,
    pub teacher: Option<&'a Llama>,
    pub data: &'a DecoderData,
    pub loss: DecoderLoss,
    pub opts: &'a HealOptions,
    pub checkpoint: Option<Checkpointing<'a>>,
    /// Extra files written into every checkpoint (e.g. the cut's `surgery.json`).
    pub extra_files: &'a [(String, Vec<u8>)],
    pub eval: Option<&'a HeldOut>,
    pub eval_every: Option<usize>,
    pub resume: Option<(TrainerState, &'a Path)>,
    pub stop: Option<&'a AtomicBool>,
    pub invocation: serde_json::Value,
}

/// AdamW's groups for a Llama: no decay on the RMSNorm weights (Hugging Face's Trainer exempts
/// every normalisation layer; Llama has no biases).
pub fn llama_decays(name: &str) -> bool {
    !name.contains("norm")
}

/// Refuses a teacher whose next-token distributions are not over the student's tokens.
pub fn check_teacher(
    files: &LlamaCheckpoint,
    teacher: &Llama,
    teacher_files: &LlamaCheckpoint,
) -> Result<()> {
    let (s, t) = (files.config.vocab_size, teacher.config.vocab_size);
    if s != t {
        return Err(SurgeryError::Invalid(format!(
            "the teacher's vocabulary has {t} tokens, the student's {s}: distillation compares \
             next-token distributions over the same tokens"
        )));
    }
    if files.tokenizer.get_vocab(true) != teacher_files.tokenizer.get_vocab(true) {
        return Err(SurgeryError::Invalid(
            "teacher and student tokenizers differ (different vocabularies)".into(),
        ));
    }
    Ok(())
}

/// The loss of the windows `indices` (before the update).
pub fn batch_loss(
    student: &Llama,
    teacher: Option<&Llama>,
    data: &DecoderData,
    indices: &[usize],
    loss: DecoderLoss,
) -> Result<Var> {
    let t = data.window_tokens;
    let mut inputs = Vec::with_capacity(indices.len() * t);
    let mut targets = Vec::with_capacity(indices.len() * t);
    for &i in indices {
        let window = &data.windows[i];
        inputs.extend_from_slice(&window[..t]);
        targets.extend(window[1..].iter().map(|&id| id as usize));
    }
    let rows = inputs.len();
    let logits_of = |model: &Llama| -> Result<Var> {
        let hidden = model.hidden_states(&inputs, indices.len(), None)?;
        let flat = ops::reshape(&hidden, &[rows, model.config.hidden_size])?;
        Ok(model.logits(&flat)?)
    };
    let logits = logits_of(student)?;
    let mut parts = Vec::new();
    if loss.distils() {
        let teacher = teacher.ok_or_else(|| {
            SurgeryError::Invalid("distillation needs a teacher model (or --lm-weight 1)".into())
        })?;
        let target = logits_of(teacher)?.value().clone();
        let kl = ops::distill_kl(&logits, &target, loss.temperature)?;
        parts.push(ops::scale(&kl, 1.0 - loss.lm_weight)?);
    }
    if loss.lm_weight > 0.0 {
        let ce = ops::cross_entropy(&logits, &targets)?;
        parts.push(ops::scale(&ce, loss.lm_weight)?);
    }
    let mut total = parts.remove(0);
    for part in parts {
        total = ops::add(&total, &part)?;
    }
    Ok(total)
}

/// Writes the student and the trainer state to `dir` atomically (staged, then swapped in).
fn save(
    dir: &Path,
    student: &Llama,
    files: &mut LlamaCheckpoint,
    extra: &[(String, Vec<u8>)],
    state: &TrainerState,
    adam: &Adam,
) -> Result<()> {
    files.weights = student.params.to_tensors();
    // A model with NaN or infinite weights predicts nothing: never write one.
    let checked = scalpel_models::check_finite(&files.weights, &dir.join("model.safetensors"));
    let written = checked.map_err(SurgeryError::from).and_then(|()| {
        write_folder(dir, |staging| {
            files.write_hf_files(staging)?;
            for (name, bytes) in extra {
                let path = staging.join(name);
                std::fs::write(&path, bytes).map_err(crate::io_err(&path))?;
            }
            write_trainer_files(staging, state, adam)
        })
    });
    files.weights.clear();
    written
}

/// Trains the student decoder until the budget is spent (or `stop` is set), as
/// [`crate::heal::heal`] trains an encoder: deterministic given the options and data, so a run
/// resumed from a checkpoint reproduces the uninterrupted losses exactly; a NaN or infinite loss
/// or gradient stops it with an error before anything is written. With held-out text, its
/// perplexity is reported (as [`HealEvent::Perplexity`]) before the first step, every
/// `eval_every` steps and at the end.
pub fn heal_decoder(
    run: DecoderHealRun,
    mut on_event: impl FnMut(HealEvent) -> Result<()>,
) -> Result<HealOutcome> {
    let DecoderHealRun {
        student,
        files,
        teacher,
        data,
        loss,
        opts,
        checkpoint,
        extra_files,
        eval,
        eval_every,
        resume,
        stop,
        invocation,
    } = run;
    loss.check()?;
    if opts.dropout != 0.0 {
        return Err(SurgeryError::Invalid(format!(
            "--dropout {}: Llama decoders have no dropout (SmolLM2 trains without it)",
            opts.dropout
        )));
    }
    let (order, total) = plan_run(opts, data.windows.len())?;
    let trainable = |name: &str| !opts.freeze.iter().any(|p| matches_pattern(p, name));
    student.params.unfreeze(trainable);
    let mut adam = Adam::new(AdamConfig::adamw(opts.weight_decay), llama_decays);
    let mut state = TrainerState {
        step: 0,
        seconds: 0.0,
        options: opts.clone(),
        examples: data.windows.len(),
        data_fingerprint: data.fingerprint(),
        log: Vec::new(),
        finished: false,
        invocation,
    };
    let resumed = resume.is_some();
    if let Some((saved, dir)) = resume {
        restore(&mut state, &mut adam, saved, dir)?;
    }
    // Evaluation runs the weights as they train (each window's graph is dropped at once).
    // Freezing them into constants for it and thawing them after made the following losses
    // differ from those of a run not evaluated (in the 3rd significant digit by step 2), so a
    // resumed run, evaluated at other steps, would not repeat them.
    let evaluate = |step: usize,
                    student: &Llama,
                    on_event: &mut dyn FnMut(HealEvent) -> Result<()>|
     -> Result<()> {
        let Some(held_out) = eval else { return Ok(()) };
        let perplexity = held_out.perplexity(student)?;
        on_event(HealEvent::Perplexity { step, perplexity })
    };
    if !resumed {
        evaluate(0, student, &mut on_event)?;
    }

    let started = Instant::now();
    let prior_seconds = state.seconds;
    let mut interrupted = false;
    let mut windows_seen = 0usize;
    let mut evaluated_at = None;
    loop {
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
        let batch = batch_loss(student, teacher, data, &indices, loss)?;
        let (loss_value, lr) =
            optimizer_step(batch, &mut student.params, &mut adam, opts, step, total)?;
        windows_seen += indices.len();
        state.step = step;
        state.seconds = prior_seconds + started.elapsed().as_secs_f64();
        state.log.push(StepLog {
            step,
            loss: loss_value,
            lr,
            seconds: state.seconds,
            device: None,
        });
        on_event(HealEvent::Step {
            log: state.log.last().expect("just pushed"),
            total,
            sentences_per_second: windows_seen as f64 / started.elapsed().as_secs_f64(),
        })?;
        if eval_every.is_some_and(|n| step.is_multiple_of(n)) {
            evaluate(step, student, &mut on_event)?;
            evaluated_at = Some(step);
        }
        if let Some(c) = checkpoint
            .as_ref()
            .filter(|c| c.every.is_some_and(|n| step.is_multiple_of(n)))
        {
            save(c.dir, student, files, extra_files, &state, &adam)?;
            on_event(HealEvent::Checkpoint { step, dir: c.dir })?;
        }
    }
    if !interrupted && evaluated_at != Some(state.step) && state.step > 0 {
        evaluate(state.step, student, &mut on_event)?;
    }
    state.finished = !interrupted;
    if let Some(c) = &checkpoint {
        save(c.dir, student, files, extra_files, &state, &adam)?;
        on_event(HealEvent::Checkpoint {
            step: state.step,
            dir: c.dir,
        })?;
    }
    student.params.freeze(|_| true);
    Ok(HealOutcome {
        log: state.log,
        step: state.step,
        interrupted,
        last_eval: None,
    })
}
