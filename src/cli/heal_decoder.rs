//! `scalpel heal` on a Llama decoder: the same flags and checkpoints as for an encoder, the
//! student distilled from the teacher's next-token distributions on windows of running text.

use std::path::{Path, PathBuf};

use scalpel::surgery::decoder_heal::{
    check_teacher, heal_decoder, DecoderData, DecoderHealRun, DecoderLoss, HeldOut,
};
use scalpel::surgery::heal::{Checkpointing, HealEvent, TrainerState};

use super::super::generate::load_llama;
use super::super::perplexity::text_token_ids;
use super::{finish, options, stop_on_ctrl_c, Args, Progress};
use crate::cli::CliResult;

/// The defaults of the decoder flags (Option in `Args`, so that checkpoints written before the
/// flags existed still resume).
const WINDOW_TOKENS: usize = 128;
/// T = 1: the KL at T = 1 is the student's cross-entropy to the teacher's distribution minus the
/// teacher's entropy, so it optimises what held-out perplexity measures (as Minitron's
/// depth-pruned models are distilled).
const TEMPERATURE: f64 = 1.0;
const EVAL_CONTEXT: usize = 512;

pub fn run(
    a: Args,
    student_dir: PathBuf,
    output: PathBuf,
    saved: Option<TrainerState>,
) -> CliResult {
    if a.loss.is_some() {
        return Err(
            "--loss is for encoders: a decoder distils next-token distributions (--temperature, \
             --lm-weight)"
                .into(),
        );
    }
    let loss = DecoderLoss {
        temperature: a.temperature.unwrap_or(TEMPERATURE),
        lm_weight: a.lm_weight.unwrap_or(0.0),
    };
    let (mut files, mut student) = load_llama(&student_dir)?;
    let teacher = match &a.teacher {
        Some(path) => {
            let (teacher_files, teacher) = load_llama(path)?;
            check_teacher(&files, &teacher, &teacher_files)?;
            Some(teacher)
        }
        None if loss.lm_weight < 1.0 => {
            return Err(
                "--teacher is required to distil a decoder (or --lm-weight 1 to train \
                        on the text alone)"
                    .into(),
            )
        }
        None => None,
    };
    let ids = text_token_ids(&files, &a.data)?;
    let data = DecoderData::from_ids(&ids, a.window_tokens.unwrap_or(WINDOW_TOKENS))?;
    let held_out = match a.eval.is_empty() {
        true => None,
        false => Some(HeldOut {
            ids: text_token_ids(&files, &a.eval)?,
            context: a.eval_context.unwrap_or(EVAL_CONTEXT),
        }),
    };
    eprintln!(
        "{} windows of {} tokens{}",
        data.windows.len(),
        data.window_tokens,
        held_out.as_ref().map_or(String::new(), |h| format!(
            "; held-out text: {} tokens",
            h.ids.len()
        ))
    );
    let extra_files = carried_files(&student_dir)?;
    let opts = options(&a, "model.layers.")?;
    let stop = stop_on_ctrl_c()?;
    let mut progress = Progress::new(&student_dir, &output, "windows");
    let mut perplexities = Vec::new();
    let outcome = heal_decoder(
        DecoderHealRun {
            student: &mut student,
            files: &mut files,
            teacher: teacher.as_ref(),
            data: &data,
            loss,
            opts: &opts,
            checkpoint: Some(Checkpointing {
                dir: &output,
                every: a.checkpoint_every,
            }),
            extra_files: &extra_files,
            eval: held_out.as_ref(),
            eval_every: a.eval_every,
            resume: saved.map(|s| (s, student_dir.as_path())),
            stop: Some(&stop),
            invocation: serde_json::to_value(&a)?,
        },
        |event| {
            if let HealEvent::Perplexity { step, perplexity } = event {
                perplexities.push((step, perplexity));
            }
            progress.show(&event);
            Ok(())
        },
    )?;
    progress.finish();
    if let (Some(first), Some(last)) = (perplexities.first(), perplexities.last()) {
        println!(
            "held-out perplexity {:.4} (step {}) -> {:.4} (step {})",
            first.1, first.0, last.1, last.0
        );
    }
    finish(&a, &outcome, &student_dir, &output)
}

/// The cut's record (`surgery.json`) of the student folder, which every checkpoint keeps.
fn carried_files(student: &Path) -> CliResult<Vec<(String, Vec<u8>)>> {
    let path = student.join("surgery.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(vec![("surgery.json".to_string(), bytes)])
}
