use std::path::PathBuf;


use scalpel::surgery::data::read_lines;

use super::CliResult;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file, one sentence per line.
    #[arg(long)]
    input: PathBuf,
}

pub fn run(a: Args) -> CliResult {
    let lines = read_lines(&a.input)?;
    let encoder = super::load_encoder(&a.model)?;
    let emb = encoder.embed(&lines, 32)?;
    let dim = emb.dim(-1);
    let rows: Vec<Vec<f64>> = emb
        .to_vec::<f64>()
        .chunks_exact(dim)
        .map(<[f64]>::to_vec)
        .collect();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    for (i, text) in lines.iter().enumerate() {
        println!("[{i}] {text}");
    }
    print!("\n     ");
    (0..rows.len()).for_each(|j| print!("{:>7}", format!("[{j}]")));
    println!();
    for (i, a) in rows.iter().enumerate() {
        print!("{:>5}", format!("[{i}]"));
        for b in &rows {
            let cos = a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>() / (norm(a) * norm(b));
            print!("{cos:>7.3}");
        }
        println!();
    }
    Ok(())
}
