use std::path::PathBuf;

use clap::Subcommand;
use scalpel::bench::{measure, peak_rss_mb, ForwardWorkload, GemmWorkload, Timings, TrainWorkload};
use scalpel::surgery::cut::parse_layer_list;
use scalpel::tensor::cpu::gemm::GemmShape;
use scalpel::tensor::cpu::gemm_bf16::Bf16Path;
use scalpel::tensor::{threads, DType};
use serde_json::{json, Value};

use super::{flags, CliResult};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    workload: Workload,
}

/// Options every workload shares.
#[derive(clap::Args)]
struct Common {
    /// Timed runs (the statistics are over these).
    #[arg(long, default_value_t = 20, value_parser = flags::positive)]
    runs: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Print one JSON object: median_s, min_s, max_s, runs, samples_s and the workload's extras.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Workload {
    /// Every CUDA kernel family timed alone on device-resident inputs (needs `--device cuda` or
    /// `emu`): milliseconds, TFLOP/s or GB/s, and cuBLAS on the same GEMMs where it is available.
    /// Small shapes on the emulator, the GPU check's shapes on a GPU.
    Kernels {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// `C = op(A)·op(B)` in f32 or bf16: square N×N operands unless M or K is given.
    Gemm {
        /// Columns of C (and, by default, rows of C and the depth).
        #[arg(long, default_value_t = 1024, value_parser = flags::positive)]
        n: usize,
        /// Rows of C (default N).
        #[arg(long, value_parser = flags::positive)]
        m: Option<usize>,
        /// Depth of the product (default N).
        #[arg(long, value_parser = flags::positive)]
        k: Option<usize>,
        /// A is stored transposed (`k×m`), as in a weight gradient `dYᵀ·X`.
        #[arg(long)]
        trans_a: bool,
        /// B is stored transposed (`n×k`), as in a linear layer's `x·Wᵀ`.
        #[arg(long)]
        trans_b: bool,
        /// `bf16`: B packed once (untimed) as a bf16 weight, A rounded to bf16 on each run,
        /// f32 accumulation and output, on the best bf16 path (`SCALPEL_ISA=amx|avx512bf16|…`);
        /// with `--trans-a` (and not `--trans-b`) the weight gradient `Aᵀ·B`, both operands
        /// rounded on each run.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
        #[command(flatten)]
        common: Common,
    },
    /// Inference: forward and pooling of synthetic sequences of exactly SEQ tokens.
    Forward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 1, value_parser = flags::positive)]
        batch: usize,
        #[arg(long, default_value_t = 128, value_parser = flags::positive)]
        seq: usize,
        /// Linear layers in `f32` (exact) or `bf16` (bf16 weights and GEMM inputs, f32
        /// accumulation; CPU only).
        #[arg(long, default_value = "f32", value_parser = flags::inference_dtype)]
        dtype: DType,
        #[command(flatten)]
        common: Common,
    },
    /// One training step: forward, pooling, MSE to a fixed target, backward, AdamW on all parameters.
    Train {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 32, value_parser = flags::positive)]
        batch: usize,
        #[arg(long, default_value_t = 128, value_parser = flags::positive)]
        seq: usize,
        /// Remove these encoder layers in memory first (e.g. `4,5` for the 4-layer MiniLM).
        #[arg(long)]
        drop: Option<String>,
        /// The GEMMs of the step in `f32` or `bf16` (mixed precision as `heal --precision bf16`:
        /// bf16 forward and input-gradient GEMMs over f32 weights; CPU only).
        #[arg(long, default_value = "f32", value_parser = flags::inference_dtype)]
        precision: DType,
        #[command(flatten)]
        common: Common,
    },
}

pub fn run(a: Args) -> CliResult {
    let threads = threads::num_threads();
    match a.workload {
        Workload::Kernels { json } => kernels(json),
        Workload::Gemm {
            n,
            m,
            k,
            trans_a,
            trans_b,
            dtype,
            common,
        } => {
            let shape = GemmShape {
                m: m.unwrap_or(n),
                n,
                k: k.unwrap_or(n),
                trans_a,
                trans_b,
            };
            if shape.m == 0 || shape.n == 0 || shape.k == 0 {
                return Err("--m, --n and --k must be at least 1".into());
            }
            let mut w = match dtype.as_str() {
                "bf16" => GemmWorkload::with_bf16(shape, Bf16Path::best())?,
                _ => GemmWorkload::with_shape(shape),
            };
            let t = measure(common.warmup, runs(&common)?, || {
                w.run();
                Ok(())
            })?;
            let gflops = w.flops() / t.median() / 1e9;
            let layout = match (trans_a, trans_b) {
                (false, false) => "",
                (true, false) => ", Aᵀ",
                (false, true) => ", Bᵀ",
                (true, true) => ", Aᵀ Bᵀ",
            };
            let kernel = match w.bf16_path() {
                Some(path) => format!("bf16 ({path:?})"),
                None => "f32".to_string(),
            };
            let label = format!(
                "gemm {}x{}x{} {kernel}{layout}, {threads} threads",
                shape.m, shape.n, shape.k
            );
            report(
                &common,
                &label,
                &t,
                json!({"gflops": gflops, "m": shape.m, "n": n, "k": shape.k, "kernel": kernel,
                       "trans_a": trans_a, "trans_b": trans_b, "threads": threads}),
                &format!("{gflops:.1} GFLOP/s"),
            )
        }
        Workload::Forward {
            model,
            batch,
            seq,
            dtype,
            common,
        } => {
            check_batch(batch)?;
            let w = ForwardWorkload::new(&model, batch, seq, super::device(), dtype)?;
            let t = measure(common.warmup, runs(&common)?, || {
                w.run()?;
                Ok(())
            })?;
            let label = format!(
                "forward {} layers, batch {batch} x seq {seq}, {dtype:?}, {threads} threads",
                w.encoder.bert.num_layers()
            );
            let extra = json!({"batch": batch, "seq": seq, "threads": threads, "layers": w.encoder.bert.num_layers(), "dtype": format!("{dtype:?}")});
            report_with_rss(&common, &label, &t, extra)
        }
        Workload::Train {
            model,
            batch,
            seq,
            drop,
            precision,
            common,
        } => {
            check_batch(batch)?;
            let drop = match drop {
                Some(text) => parse_layer_list(&text)?,
                None => Vec::new(),
            };
            let mut w = TrainWorkload::new(&model, batch, seq, &drop, super::device())?;
            w.encoder.bert.set_linear_compute(precision)?;
            let t = measure(common.warmup, runs(&common)?, || w.step())?;
            if !w.last_loss.is_finite() {
                return Err(
                    format!("training produced a non-finite loss ({})", w.last_loss).into(),
                );
            }
            let layers = w.encoder.bert.num_layers();
            let label = format!(
                "train step {layers} layers, batch {batch} x seq {seq}, {precision:?}, {threads} threads"
            );
            let extra = json!({"batch": batch, "seq": seq, "threads": threads, "layers": layers, "loss": w.last_loss, "precision": format!("{precision:?}")});
            report_with_rss(&common, &label, &t, extra)
        }
    }
}

fn runs(common: &Common) -> CliResult<usize> {
    if common.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    Ok(common.runs)
}

fn check_batch(batch: usize) -> CliResult {
    if batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    Ok(())
}

fn report_with_rss(common: &Common, label: &str, t: &Timings, mut extra: Value) -> CliResult {
    let rss = peak_rss_mb();
    extra["peak_rss_mb"] = json!(rss);
    let line = match rss {
        Some(mb) => format!("peak RSS {mb:.1} MB"),
        None => "peak RSS unavailable (no /proc/self/status)".to_string(),
    };
    report(common, label, t, extra, &line)
}

fn report(common: &Common, label: &str, t: &Timings, extra: Value, line: &str) -> CliResult {
    if common.json {
        let mut out = json!({
            "median_s": t.median(), "min_s": t.min(), "max_s": t.max(), "runs": t.runs(),
            "samples_s": t.samples,
        });
        if let (Some(out), Value::Object(extra)) = (out.as_object_mut(), extra) {
            out.extend(extra);
        }
        println!("{out}");
    } else {
        println!("{label}: {} runs after {} warm-up", t.runs(), common.warmup);
        println!(
            "  median {:.3} ms, min {:.3} ms, max {:.3} ms",
            t.median() * 1e3,
            t.min() * 1e3,
            t.max() * 1e3
        );
        println!("  {line}");
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn kernels(_: bool) -> CliResult {
    Err("this scalpel was built without the `cuda` feature: it has no CUDA kernels".into())
}

#[cfg(feature = "cuda")]
fn kernels(json: bool) -> CliResult {
    let device = super::device();
    let rt = device
        .backend()
        .and_then(|b| b.as_any().downcast_ref::<scalpel::cuda::Runtime>())
        .ok_or("bench kernels times the CUDA kernels: give --device cuda or --device emu")?;
    let timings = scalpel::cuda::bench::run(rt, &scalpel::cuda::bench::BenchPlan::for_runtime(rt))?;
    if json {
        let rows: Vec<Value> = timings
            .iter()
            .map(|t| {
                let (rate, unit) = t.rate();
                let mut row = serde_json::to_value(t).expect("timings serialise");
                row["rate"] = rate.into();
                row["unit"] = unit.into();
                row["vs_cublas"] = t.cublas_ms.map(|c| c / t.ms).into();
                row
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("kernels on {}", device.name());
    println!(
        "{:<28} {:<22} {:>10} {:>12} {:>10}",
        "kernel", "case", "ms", "rate", "vs cuBLAS"
    );
    for t in &timings {
        let (rate, unit) = t.rate();
        let versus = t
            .cublas_ms
            .map_or("-".to_string(), |c| format!("{:.2}", c / t.ms));
        println!(
            "{:<28} {:<22} {:>10.4} {:>7.3} {unit:<7} {versus:>6}",
            t.kernel, t.case, t.ms, rate
        );
    }
    Ok(())
}
