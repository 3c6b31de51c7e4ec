mod bench;
mod cut;
mod embed;
mod eval;
mod flags;
mod heal;
mod inspect;
mod kernels;
mod new_head;
mod score;
mod similarity;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

/// Any error a command reports: printed as one line naming the problem.
pub type CliResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "scalpel",
    version,
    about = "Load, score, cut and heal transformer encoders"
)]
pub struct Cli {
    /// Worker threads for the CPU kernels (default: SCALPEL_THREADS, else all cores).
    #[arg(long, global = true, value_parser = flags::positive)]
    threads: Option<usize>,
    /// Where the ops run: auto (CUDA when a GPU, its driver and NVRTC are present, else the CPU),
    /// cpu, cuda (an error naming what is missing when unusable), or emu (the CUDA kernels on the
    /// CPU emulator: for testing the CUDA path without a GPU; scalar, so slow on big shapes).
    #[arg(
        long,
        global = true,
        default_value = "auto",
        value_name = "auto|cpu|cuda|emu"
    )]
    device: scalpel::autograd::device::DeviceKind,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed each line of a text file; writes JSON lines {"text", "embedding"} in input order.
    Embed(embed::Args),
    /// Print the architecture: every layer with its parameters and FLOPs per token.
    Inspect(inspect::Args),
    /// Print the cosine-similarity matrix of the sentence embeddings of a text file's lines.
    Similarity(similarity::Args),
    /// Score each layer's importance on calibration data (four metrics) and suggest a cut.
    Score(score::Args),
    /// Remove encoder layers and write a complete, renumbered checkpoint.
    Cut(cut::Args),
    /// Retrain a cut model (AdamW): distil the teacher's embeddings or fine-tune on pairs.
    Heal(heal::Args),
    /// Spearman correlation on STS/SICK files, and agreement with a teacher.
    Eval(eval::Args),
    /// Compile every CUDA kernel with NVRTC and check each on the CPU emulator.
    Kernels(kernels::Args),
    /// Train a new classification head on sentence-pair embeddings (e.g. SICK entailment).
    NewHead(new_head::Args),
    /// Time a workload (GEMM, forward, train step): median/min/max over runs, peak RSS.
    Bench(bench::Args),
}

pub fn run(cli: Cli) -> CliResult {
    if let Some(n) = cli.threads {
        scalpel::tensor::threads::set_num_threads(n);
    }
    let (device, picked) = scalpel::autograd::device::Device::resolve(cli.device)?;
    eprintln!("device: {picked}");
    scalpel::autograd::device::set_device(device);
    match cli.command {
        Command::Embed(a) => embed::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Similarity(a) => similarity::run(a),
        Command::Score(a) => score::run(a),
        Command::Cut(a) => cut::run(a),
        Command::Heal(a) => heal::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Kernels(a) => kernels::run(a),
        Command::NewHead(a) => new_head::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so an interrupted run never
/// leaves a half-written output, and refuses to overwrite any of `inputs`.
pub fn write_atomically(path: &Path, contents: &[u8], inputs: &[&Path]) -> CliResult {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    if inputs
        .iter()
        .any(|i| canonical(i).is_some() && canonical(i) == canonical(path))
    {
        return Err(format!("{}: refusing to overwrite an input file", path.display()).into());
    }
    let tmp = PathBuf::from(format!("{}.tmp-{}", path.display(), std::process::id()));
    std::fs::write(&tmp, contents).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })?;
    Ok(())
}
