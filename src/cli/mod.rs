mod bench;
mod convert;
mod cut;
mod embed;
mod eval;
mod flags;
mod generate;
mod heal;
mod inspect;
mod kernels;
mod new_head;
mod perplexity;
mod score;
mod serve;
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
    /// Writes the device runtime's counters to FILE as JSON at exit: host→device and
    /// device→host bytes, driver allocations and frees, kernel launches, peak device bytes
    /// (all zero on the CPU).
    #[arg(long, global = true, value_name = "FILE")]
    device_stats: Option<PathBuf>,
    /// Say more: why `--device auto` chose the CPU (every missing piece of the CUDA setup).
    #[arg(long, global = true)]
    verbose: bool,
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
    Heal(Box<heal::Args>),
    /// Spearman correlation on STS/SICK files, and agreement with a teacher.
    Eval(eval::Args),
    /// Compile every CUDA kernel with NVRTC and check each on the CPU emulator.
    Kernels(kernels::Args),
    /// Train a new classification head on sentence-pair embeddings (e.g. SICK entailment).
    NewHead(new_head::Args),
    /// Time a workload (GEMM, forward, train step): median/min/max over runs, peak RSS.
    Bench(bench::Args),
    /// Convert a Llama-family GGUF file into a Hugging Face folder (f32 safetensors, tokenizer).
    Convert(convert::Args),
    /// Continue a prompt with a Llama-family model (GGUF or folder), streaming the text.
    Generate(generate::Args),
    /// Sliding-window perplexity of a Llama-family model on text files.
    Perplexity(perplexity::Args),
    /// Serve embeddings over HTTP (text-embeddings-inference and OpenAI routes) with dynamic batching.
    Serve(serve::Args),
}

pub fn run(cli: Cli) -> CliResult {
    if let Some(n) = cli.threads {
        scalpel::tensor::threads::set_num_threads(n);
    }
    use scalpel::autograd::device::DeviceKind;
    let decoder = cli.command.scores_a_decoder();
    if decoder && matches!(cli.device, DeviceKind::Cuda | DeviceKind::Emu) {
        return Err(format!(
            "--device {}: Llama decoders run on the CPU only so far for score and cut (generate \
             and perplexity run on a device); use --device cpu or auto",
            cli.device
        )
        .into());
    }
    let (device, fallback) = if decoder {
        (scalpel::tensor::Device::Cpu, None)
    } else {
        scalpel::autograd::device::resolve(cli.device)?
    };
    // Said once, where a command computes; the long story only when asked (`scalpel kernels`
    // reports the CUDA setup in full anyway).
    if decoder {
        eprintln!("device: cpu (Llama decoders run on the CPU only so far for score and cut)");
    } else if cli.command.computes() {
        match (fallback, cli.verbose) {
            (Some(why), true) => eprintln!("device: {} ({why})", device.name()),
            (Some(_), false) => eprintln!(
                "device: {} (no usable GPU; --verbose says why)",
                device.name()
            ),
            (None, _) => eprintln!("device: {}", device.name()),
        }
    }
    let _ = DEVICE.set(device);
    let result = run_command(cli.command);
    if let Some(path) = &cli.device_stats {
        let stats = self::device().stats().unwrap_or_default();
        let mut json = serde_json::to_value(stats)?;
        json["device"] = self::device().name().into();
        write_atomically(path, serde_json::to_string_pretty(&json)?.as_bytes(), &[])?;
    }
    result
}

static DEVICE: std::sync::OnceLock<scalpel::tensor::Device> = std::sync::OnceLock::new();

/// The device `--device` resolved to: commands move their models there once.
pub fn device() -> &'static scalpel::tensor::Device {
    DEVICE.get_or_init(Default::default)
}

/// Loads a sentence encoder and moves it to [`device`].
pub fn load_encoder(dir: &Path) -> CliResult<scalpel::models::sentence::SentenceEncoder> {
    let mut encoder = scalpel::models::sentence::SentenceEncoder::load(dir)?;
    encoder.to_device(device())?;
    Ok(encoder)
}

impl Command {
    /// Whether the command runs a model (and so where it runs is worth a line).
    fn computes(&self) -> bool {
        match self {
            Command::Cut(a) => a.computes(),
            Command::Inspect(_) | Command::Kernels(_) | Command::Convert(_) => false,
            _ => true,
        }
    }
}

impl Command {
    /// Whether the command scores or cuts a Llama decoder, which runs on the CPU only so far
    /// (`generate` and `perplexity` run wherever `--device` says).
    fn scores_a_decoder(&self) -> bool {
        match self {
            Command::Score(a) => is_decoder(a.model()),
            Command::Cut(a) => a.computes() && is_decoder(a.model()),
            Command::Heal(a) => a.runs_decoder(),
            _ => false,
        }
    }
}

fn run_command(command: Command) -> CliResult {
    match command {
        Command::Embed(a) => embed::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Similarity(a) => similarity::run(a),
        Command::Score(a) => score::run(a),
        Command::Cut(a) => cut::run(a),
        Command::Heal(a) => heal::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Kernels(a) => kernels::run(a),
        Command::NewHead(a) => new_head::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Perplexity(a) => perplexity::run(a),
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so an interrupted run never
/// leaves a half-written output, and refuses to overwrite any of `inputs`.
/// Whether `model` is a Llama-family decoder: a (GGUF) file, or a folder whose `config.json`
/// says `"model_type": "llama"`. Everything else, a missing path included, is taken for a BERT
/// encoder folder (whose loader names what is missing).
pub fn is_decoder(model: &Path) -> bool {
    if model.is_file() {
        return true;
    }
    std::fs::read_to_string(model.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|config| config["model_type"] == "llama")
}

pub fn write_atomically(path: &Path, contents: &[u8], inputs: &[&Path]) -> CliResult {
    let tmp = staging_path(path, inputs)?;
    std::fs::write(&tmp, contents).map_err(|e| format!("{}: {e}", tmp.display()))?;
    commit_staged(&tmp, path)
}

/// The temporary file an output `path` is written to before [`commit_staged`] renames it into
/// place; an error if `path` is one of `inputs`.
pub fn staging_path(path: &Path, inputs: &[&Path]) -> CliResult<PathBuf> {
    let canonical = |p: &Path| std::fs::canonicalize(p).ok();
    if inputs
        .iter()
        .any(|i| canonical(i).is_some() && canonical(i) == canonical(path))
    {
        return Err(format!("{}: refusing to overwrite an input file", path.display()).into());
    }
    Ok(PathBuf::from(format!(
        "{}.tmp-{}",
        path.display(),
        std::process::id()
    )))
}

/// Renames the complete `tmp` to `path` (removing `tmp` if that fails).
pub fn commit_staged(tmp: &Path, path: &Path) -> CliResult {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        format!("{}: {e}", path.display()).into()
    })
}
