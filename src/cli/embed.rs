use std::path::PathBuf;

use scalpel::models::sentence::SentenceEncoder;
use serde_json::json;

use scalpel::surgery::data::read_lines;

use super::{flags, write_atomically, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json, sentence-transformers files).
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file, one sentence per line.
    #[arg(long)]
    input: PathBuf,
    /// Output file: JSON lines {"text": ..., "embedding": [...]}.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 32, value_parser = flags::positive)]
    batch_size: usize,
}

pub fn run(a: Args) -> CliResult {
    let lines = read_lines(&a.input)?;
    let encoder = SentenceEncoder::load(&a.model)?;
    let started = std::time::Instant::now();
    let embeddings = encoder.embed(&lines, a.batch_size)?;
    let dim = embeddings.dim(-1);
    let values = embeddings.to_vec::<f32>();
    let mut out = String::new();
    for (text, row) in lines.iter().zip(values.chunks_exact(dim)) {
        out.push_str(&json!({ "text": text, "embedding": row }).to_string());
        out.push('\n');
    }
    write_atomically(&a.output, out.as_bytes(), &[&a.input, &a.model])?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "embedded {} sentences in {secs:.2} s ({:.1} sentences/s) -> {}",
        lines.len(),
        lines.len() as f64 / secs,
        a.output.display()
    );
    Ok(())
}
