use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use scalpel::models::llama::chat::{apply_chat_template, Message};
use scalpel::models::llama::generate::{generate, Sampling};
use scalpel::models::llama::{Llama, LlamaCheckpoint};

use scalpel::tensor::DType;

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// A Llama-family model: a llama.cpp GGUF file, or a Hugging Face `LlamaForCausalLM` folder
    /// (what `scalpel convert` writes).
    #[arg(long, value_name = "FILE.gguf|DIR")]
    model: PathBuf,
    /// The text to continue (with --chat: the user's message).
    #[arg(long)]
    prompt: String,
    /// The most tokens to generate (fewer when the model ends its text or the context is full).
    #[arg(long, default_value_t = 128, value_parser = flags::positive)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, default_value_t = 0.0, value_parser = flags::finite_non_negative)]
    temperature: f64,
    /// Nucleus sampling: draw only from the most likely tokens whose probabilities sum to P.
    #[arg(long, default_value_t = 1.0, value_parser = flags::nucleus)]
    top_p: f64,
    /// Seed of the sampler (the same seed, prompt and flags give the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Send the prompt as a user message through the model's chat template
    /// (`tokenizer.chat_template`).
    #[arg(long)]
    chat: bool,
    /// The format of the linear weights (projections and LM head): `f32` (exact) or `bf16`
    /// (rounded once; products accumulate in f32; half the bytes a token streams).
    #[arg(long, default_value = "f32", value_parser = flags::inference_dtype)]
    dtype: DType,
}

/// Loads a Llama-family GGUF file or folder for inference (every weight a constant, so no
/// autograd graph is recorded), reporting how long it took.
pub fn load_llama(path: &Path) -> CliResult<(LlamaCheckpoint, Llama)> {
    let start = Instant::now();
    let mut checkpoint = LlamaCheckpoint::load(path)?;
    let mut model = checkpoint.model(path)?;
    model.params.freeze(|_| true);
    let c = &model.config;
    eprintln!(
        "{}: Llama, {} layers, hidden {}, context {} ({:.1} s to load)",
        path.display(),
        c.num_hidden_layers,
        c.hidden_size,
        c.max_position_embeddings,
        start.elapsed().as_secs_f64()
    );
    Ok((checkpoint, model))
}

fn token_text(checkpoint: &LlamaCheckpoint, id: Option<u32>) -> String {
    id.and_then(|id| checkpoint.tokenizer.id_to_token(id))
        .unwrap_or_default()
}

pub fn run(args: Args) -> CliResult {
    let (checkpoint, mut model) = load_llama(&args.model)?;
    // The weights go up once; each step then sends its token id and reads back the logits row.
    model.to_device(super::device())?;
    // bf16 weights are a CPU format: on a device this is an error naming the first weight.
    model.set_linear_dtype(args.dtype)?;
    let c = &model.config;
    let (text, special) = if args.chat {
        let template = checkpoint.chat_template().ok_or_else(|| {
            format!(
                "{}: --chat needs a chat template, and the model has none",
                args.model.display()
            )
        })?;
        let messages = [Message {
            role: "user".into(),
            content: args.prompt.clone(),
        }];
        let bos = token_text(&checkpoint, c.bos_token_id);
        let eos = token_text(&checkpoint, c.eos_token_id);
        // The template writes every special token itself.
        (
            apply_chat_template(template, &messages, true, &bos, &eos)?,
            false,
        )
    } else {
        (args.prompt.clone(), true)
    };
    let prompt = checkpoint
        .tokenizer
        .encode(text, special)
        .map_err(|e| format!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let stop: Vec<u32> = c.eos_token_id.into_iter().collect();
    let mut stdout = std::io::stdout().lock();
    let (mut generated, mut printed) = (Vec::new(), 0);
    let start = Instant::now();
    let mut first_token = None;
    let tokens = generate(&model, &prompt, args.max_tokens, &sampling, &stop, |id| {
        first_token.get_or_insert_with(|| start.elapsed());
        generated.push(id);
        // Decoding the whole continuation each time keeps multi-byte characters that span
        // tokens whole: nothing is printed while the text ends inside one.
        let text = checkpoint
            .tokenizer
            .decode(&generated, true)
            .map_err(|e| scalpel::models::ModelError::Input(format!("decoding: {e}")))?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
            let _ = stdout.write_all(&text.as_bytes()[printed..]);
            let _ = stdout.flush();
            printed = text.len();
        }
        Ok(())
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let text = checkpoint
        .tokenizer
        .decode(&tokens, true)
        .unwrap_or_default();
    if text.len() > printed && text.is_char_boundary(printed) {
        stdout.write_all(&text.as_bytes()[printed..])?;
    }
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    eprintln!(
        "{} tokens in {elapsed:.2} s: {:.1} tokens/s ({} prompt tokens; first token after {:.2} s)",
        tokens.len(),
        tokens.len() as f64 / elapsed,
        prompt.len(),
        first_token.map_or(elapsed, |t| t.as_secs_f64())
    );
    Ok(())
}
