use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use scalpel::surgery::data::MAX_LINE_BYTES;
use scalpel::tensor::DType;

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json, sentence-transformers files).
    #[arg(long)]
    model: PathBuf,
    /// UTF-8 text file, one sentence per line (`-`: standard input).
    #[arg(long)]
    input: PathBuf,
    /// Output file: JSON lines {"text": ..., "embedding": [...]} (`-`: standard output).
    #[arg(long)]
    output: PathBuf,
    /// Sentences per forward (sorted by length first, so a batch carries little padding).
    #[arg(long, default_value_t = 32, value_parser = flags::positive)]
    batch_size: usize,
    /// Linear layers in `f32` (exact) or `bf16`: weights held in bf16, each linear layer a bf16
    /// GEMM with f32 accumulation, the rest in f32 (CPU only).
    #[arg(long, default_value = "f32", value_parser = flags::inference_dtype)]
    dtype: DType,
}

/// Lines read and embedded at a time: the output is written chunk by chunk, never held whole;
/// within a chunk the embedder sorts sentences by length, so batches carry little padding.
const CHUNK_LINES: usize = 4096;

pub fn run(a: Args) -> CliResult {
    let dash = Path::new("-");
    let mut input: Box<dyn BufRead> = if a.input == dash {
        Box::new(std::io::stdin().lock())
    } else {
        let file =
            std::fs::File::open(&a.input).map_err(|e| format!("{}: {e}", a.input.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut output = Output::create(&a.output, &[&a.input, &a.model])?;
    let embedder = scalpel::Embedder::builder(&a.model)
        .device(super::device().clone())
        .max_batch_sequences(a.batch_size.max(1))
        .dtype(a.dtype)
        .build()?;
    let started = std::time::Instant::now();
    let (mut line_number, mut total) = (0, 0);
    loop {
        let mut lines = Vec::with_capacity(CHUNK_LINES);
        while lines.len() < CHUNK_LINES {
            let mut bytes = Vec::new();
            // At most one byte past the limit is read, so a hostile line costs bounded memory.
            if std::io::Read::take(&mut input, MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut bytes)
                .map_err(|e| format!("{}: {e}", a.input.display()))?
                == 0
            {
                break;
            }
            line_number += 1;
            if bytes.len() > MAX_LINE_BYTES {
                return Err(format!(
                    "{}:{line_number}: a line longer than {MAX_LINE_BYTES} bytes",
                    a.input.display()
                )
                .into());
            }
            let text = String::from_utf8(bytes).map_err(|_| {
                format!("{}:{line_number}: not valid UTF-8 text", a.input.display())
            })?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            lines.push(text.strip_suffix('\r').unwrap_or(text).to_string());
        }
        if lines.is_empty() {
            break;
        }
        for (text, row) in lines.iter().zip(embedder.embed(&lines)?) {
            writeln!(
                output.writer,
                "{}",
                json!({ "text": text, "embedding": row })
            )
            .map_err(|e| format!("{}: {e}", a.output.display()))?;
        }
        total += lines.len();
    }
    output.finish()?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "embedded {total} sentences in {secs:.2} s ({:.1} sentences/s) -> {}",
        total as f64 / secs,
        a.output.display()
    );
    Ok(())
}

/// Standard output, or a file written through a temporary and renamed into place when complete
/// (an interrupted or failed run leaves no output, half-written or stale), never one of the inputs.
struct Output {
    writer: Box<dyn Write>,
    /// `(temporary, final path)` until renamed.
    staged: Option<(PathBuf, PathBuf)>,
}

impl Output {
    fn create(path: &Path, inputs: &[&Path]) -> CliResult<Output> {
        if path == Path::new("-") {
            return Ok(Output {
                writer: Box::new(BufWriter::new(std::io::stdout().lock())),
                staged: None,
            });
        }
        let tmp = super::staging_path(path, inputs)?;
        let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        Ok(Output {
            writer: Box::new(BufWriter::new(file)),
            staged: Some((tmp, path.to_owned())),
        })
    }

    fn finish(&mut self) -> CliResult {
        self.writer.flush()?;
        match self.staged.take() {
            Some((tmp, path)) => super::commit_staged(&tmp, &path),
            None => Ok(()),
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some((tmp, _)) = &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
