use std::path::PathBuf;
use std::time::Instant;

use scalpel::models::llama::LlamaCheckpoint;
use scalpel::surgery::checkpoint::{check_output, write_llama};

use super::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// A llama.cpp GGUF file of a Llama-family model (never modified).
    #[arg(long, value_name = "FILE.gguf")]
    model: PathBuf,
    /// Output folder: a Hugging Face `LlamaForCausalLM` checkpoint with f32 weights.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> CliResult {
    check_output(&args.model, &args.output, args.force)?;
    let start = Instant::now();
    let checkpoint = LlamaCheckpoint::from_gguf(&args.model)?;
    let c = &checkpoint.config;
    eprintln!(
        "{}: {} layers, hidden {}, {} heads ({} key/value), FFN {}, vocabulary {}{} ({:.1} s)",
        args.model.display(),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
        if c.tie_word_embeddings {
            ", tied embeddings"
        } else {
            ""
        },
        start.elapsed().as_secs_f64()
    );
    write_llama(&checkpoint, &args.output, &[])?;
    eprintln!("wrote {}", args.output.display());
    Ok(())
}
