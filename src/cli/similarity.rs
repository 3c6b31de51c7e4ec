use std::path::PathBuf;

use scalpel::surgery::data::read_lines;

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json, sentence-transformers files).
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file, one sentence per line.
    #[arg(long)]
    input: PathBuf,
    /// Sentences per forward.
    #[arg(long, default_value_t = 32, value_parser = flags::positive)]
    batch_size: usize,
    /// Print `{"sentences": [...], "cosine": [[...]]}` instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> CliResult {
    let lines = read_lines(&a.input)?;
    let encoder = super::load_encoder(&a.model)?;
    let emb = encoder.embed(&lines, a.batch_size)?;
    let dim = emb.dim(-1);
    let rows: Vec<Vec<f64>> = emb
        .to_vec::<f64>()
        .chunks_exact(dim)
        .map(<[f64]>::to_vec)
        .collect();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    let cosine = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b))
    };
    if a.json {
        let matrix: Vec<Vec<f64>> = rows
            .iter()
            .map(|x| rows.iter().map(|y| cosine(x, y)).collect())
            .collect();
        let out = serde_json::json!({ "sentences": lines, "cosine": matrix });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (i, text) in lines.iter().enumerate() {
        println!("[{i}] {text}");
    }
    print!("\n     ");
    (0..rows.len()).for_each(|j| print!("{:>7}", format!("[{j}]")));
    println!();
    for (i, a) in rows.iter().enumerate() {
        print!("{:>5}", format!("[{i}]"));
        for b in &rows {
            print!("{:>7.3}", cosine(a, b));
        }
        println!();
    }
    Ok(())
}
