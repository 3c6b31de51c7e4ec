use std::path::PathBuf;

use scalpel::surgery::data::{read_pairs, PairFile};
use scalpel::surgery::eval::evaluate;

use scalpel::tensor::DType;

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// The model to evaluate.
    #[arg(long)]
    model: PathBuf,
    /// STS (.tsv: score, sentence, sentence) or SICK files; only scored pairs count. Several files: `--sts a b` or repeated flags.
    #[arg(long, required = true, num_args = 1..)]
    sts: Vec<PathBuf>,
    /// Also report the mean cosine between this model's and the teacher's embeddings.
    #[arg(long)]
    teacher: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    /// Linear layers of the model in `f32` (exact) or `bf16` (the teacher stays f32): weights
    /// held in bf16, each linear layer a bf16 GEMM with f32 accumulation, the rest in f32 (CPU
    /// only).
    #[arg(long, default_value = "f32", value_parser = flags::inference_dtype)]
    dtype: DType,
}

/// Spearman ×100 of cosine similarity against the gold scores, per file and averaged.
pub fn run(a: Args) -> CliResult {
    let files: Vec<PairFile> = a
        .sts
        .iter()
        .map(|p| read_pairs(p))
        .collect::<Result<_, _>>()?;
    if let Some(f) = files.iter().find(|f| f.scored().next().is_none()) {
        return Err(format!("{}: no scored pairs to evaluate", f.path.display()).into());
    }
    let mut model = super::load_encoder(&a.model)?;
    model.bert.set_linear_dtype(a.dtype)?;
    let teacher = a.teacher.as_deref().map(super::load_encoder).transpose()?;
    let report = evaluate(&model, &files, teacher.as_ref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{:<60} {:>6} {:>9}", "file", "pairs", "spearman");
    for f in &report.files {
        println!("{:<60} {:>6} {:>9.2}", f.path, f.pairs, f.spearman);
    }
    println!("{:<60} {:>6} {:>9.2}", "mean", "", report.mean_spearman);
    if let Some(c) = report.teacher_cosine {
        println!("teacher cosine {c:.5}");
    }
    println!("{:.1} sentences/s", report.sentences_per_second);
    Ok(())
}
