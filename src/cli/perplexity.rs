use std::path::PathBuf;
use std::time::Instant;

use scalpel::models::llama::perplexity::perplexity;
use scalpel::models::llama::LlamaCheckpoint;

use super::generate::load_llama;
use scalpel::tensor::DType;

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// A Llama-family model: a llama.cpp GGUF file or a Hugging Face `LlamaForCausalLM` folder.
    #[arg(long, value_name = "FILE.gguf|DIR")]
    model: PathBuf,
    /// UTF-8 text files, scored as one text (joined by blank lines, as the transformers
    /// perplexity guide joins its dataset).
    #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
    text: Vec<PathBuf>,
    /// Tokens per window.
    #[arg(long, default_value_t = 512, value_parser = flags::positive)]
    context: usize,
    /// Tokens between window starts; each window scores only the tokens the previous one did not.
    #[arg(long, default_value_t = 256, value_parser = flags::positive)]
    stride: usize,
    /// Print the result (and every window's mean negative log-likelihood) as JSON.
    #[arg(long)]
    json: bool,
    /// The format of the linear weights (projections and LM head): `f32` (exact) or `bf16`
    /// (rounded once; products accumulate in f32; half the bytes a token streams).
    #[arg(long, default_value = "f32", value_parser = flags::inference_dtype)]
    dtype: DType,
}

/// The UTF-8 text files joined by blank lines (as the transformers perplexity guide joins its
/// dataset), tokenized as one stream.
pub fn text_token_ids(checkpoint: &LlamaCheckpoint, paths: &[PathBuf]) -> CliResult<Vec<u32>> {
    let mut texts = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            format!(
                "{}: not UTF-8 text (invalid byte at offset {})",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        texts.push(text);
    }
    Ok(checkpoint
        .tokenizer
        .encode(texts.join("\n\n"), true)
        .map_err(|e| format!("tokenizing the text: {e}"))?
        .get_ids()
        .to_vec())
}

pub fn run(args: Args) -> CliResult {
    let (checkpoint, mut model) = load_llama(&args.model)?;
    model.to_device(super::device())?;
    // bf16 weights are a CPU format: on a device this is an error naming the first weight.
    model.set_linear_dtype(args.dtype)?;
    let ids = text_token_ids(&checkpoint, &args.text)?;
    let start = Instant::now();
    let result = perplexity(&model, &ids, args.context, args.stride)?;
    let elapsed = start.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.5}) over {} of {} tokens: {} windows of {}, stride {}",
            result.perplexity,
            result.mean_nll,
            result.tokens_scored,
            result.tokens,
            result.windows.len(),
            args.context,
            args.stride
        );
    }
    eprintln!(
        "{:.1} s ({:.0} tokens/s)",
        elapsed,
        result.tokens_scored as f64 / elapsed
    );
    Ok(())
}
