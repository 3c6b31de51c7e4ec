//! Speed and memory measurement behind `scalpel bench` and the criterion benches: wall-clock
//! statistics over repeated runs, peak resident memory, and the three standard workloads (an f32
//! GEMM, a MiniLM forward, one training step) built exactly as the PyTorch comparison in
//! `benches/compare/` builds them.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Instant;

use scalpel_autograd::optim::{decays_by_default, Adam, AdamConfig};
use scalpel_autograd::{ops, Var};
use scalpel_models::bert::ForwardOptions;
use scalpel_models::sentence::SentenceEncoder;
use scalpel_models::tokenizer::Batch;
use scalpel_surgery::cut::keep_layers;
use scalpel_tensor::cpu::gemm::{gemm, Activation, GemmShape};
use scalpel_tensor::cpu::gemm_bf16::{
    gemm_bf16_at_b, gemm_bf16_packed, Bf16Input, Bf16Path, PackedBf16Weight,
};
use scalpel_tensor::{DType, Device, Tensor};

/// Any error a workload reports.
pub type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Wall-clock seconds of each timed run (warm-up runs excluded), in run order.
#[derive(Clone, Debug, PartialEq)]
pub struct Timings {
    /// Seconds of each timed run, in run order.
    pub samples: Vec<f64>,
}

impl Timings {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    /// The median (the mean of the two middle samples for an even count); 0 without samples.
    pub fn median(&self) -> f64 {
        let s = self.sorted();
        match s.len() {
            0 => 0.0,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        }
    }

    /// The fastest run, in seconds.
    pub fn min(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// The slowest run, in seconds.
    pub fn max(&self) -> f64 {
        self.samples
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }

    /// How many runs were timed.
    pub fn runs(&self) -> usize {
        self.samples.len()
    }
}

/// Runs `f` `warmup` times untimed, then `runs` times timed.
pub fn measure(
    warmup: usize,
    runs: usize,
    mut f: impl FnMut() -> BenchResult,
) -> BenchResult<Timings> {
    for _ in 0..warmup {
        f()?;
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed().as_secs_f64());
    }
    Ok(Timings { samples })
}

/// A `kB` field of `/proc/self/status` in MiB (Linux only; `None` elsewhere).
fn proc_status_mb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Peak resident set size of this process so far (`VmHWM`), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    proc_status_mb("VmHWM:")
}

/// Current resident set size (`VmRSS`), in MiB.
pub fn current_rss_mb() -> Option<f64> {
    proc_status_mb("VmRSS:")
}

/// Deterministic pseudo-random f32s in `[-1, 1)` (SplitMix64), so every run sees the same data.
pub fn synthetic_values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// f32 operands and output for one `C = op(A)·op(B)` (square `n×n` by default), multiplied in
/// f32 or in bf16 ([`GemmWorkload::with_bf16`]).
pub struct GemmWorkload {
    /// The multiply's sizes.
    pub shape: GemmShape,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    bf16: Option<Bf16Gemm>,
}

/// The two bf16 GEMMs of a linear layer.
enum Bf16Gemm {
    /// `A·op(B)` with B packed once as a weight (its forward and input gradient).
    Linear(PackedBf16Weight),
    /// `Aᵀ·B` of two activations, both rounded on each run (its weight gradient `dYᵀ·X`).
    WeightGradient(Bf16Path),
}

impl GemmWorkload {
    /// `C = A·B` with square `n×n` operands.
    pub fn new(n: usize) -> GemmWorkload {
        GemmWorkload::with_shape(GemmShape {
            m: n,
            n,
            k: n,
            trans_a: false,
            trans_b: false,
        })
    }

    /// Any shape and layout, e.g. a linear layer's `x·Wᵀ` (`trans_b`).
    pub fn with_shape(shape: GemmShape) -> GemmWorkload {
        GemmWorkload {
            shape,
            a: synthetic_values(shape.m * shape.k, 1),
            b: synthetic_values(shape.k * shape.n, 2),
            c: vec![0.0; shape.m * shape.n],
            bf16: None,
        }
    }

    /// The same operands multiplied in bf16 with f32 accumulation on `path`, as a bf16 linear
    /// layer would: `A·op(B)` with B packed once as a bf16 weight (untimed), A rounded on each
    /// run; or, with `trans_a` (and not `trans_b`), the weight gradient `Aᵀ·B`, both operands
    /// rounded on each run.
    pub fn with_bf16(shape: GemmShape, path: Bf16Path) -> BenchResult<GemmWorkload> {
        let mut w = GemmWorkload::with_shape(shape);
        if shape.trans_a {
            if shape.trans_b {
                return Err(
                    "a bf16 GEMM is A·op(B) (a linear layer) or Aᵀ·B (its weight \
                            gradient), not Aᵀ·Bᵀ"
                        .into(),
                );
            }
            w.bf16 = Some(Bf16Gemm::WeightGradient(path));
            return Ok(w);
        }
        // The weight is `[n, k]`: B itself when stored transposed, else B transposed.
        let (n, k) = (shape.n, shape.k);
        let weight: Vec<f32> = if shape.trans_b {
            w.b.clone()
        } else {
            (0..n * k).map(|i| w.b[(i % k) * n + i / k]).collect()
        };
        w.bf16 = Some(Bf16Gemm::Linear(PackedBf16Weight::pack(
            path, &weight, n, k,
        )));
        Ok(w)
    }

    /// The bf16 path the workload runs on (`None`: f32).
    pub fn bf16_path(&self) -> Option<Bf16Path> {
        self.bf16.as_ref().map(|g| match g {
            Bf16Gemm::Linear(w) => w.path(),
            Bf16Gemm::WeightGradient(path) => *path,
        })
    }

    /// One GEMM on the current thread count.
    pub fn run(&mut self) {
        let GemmShape { m, n, k, .. } = self.shape;
        match &self.bf16 {
            Some(Bf16Gemm::Linear(w)) => {
                gemm_bf16_packed(&self.a, m, w, None, Activation::Identity, &mut self.c)
            }
            Some(Bf16Gemm::WeightGradient(path)) => {
                // SAFETY: `MaybeUninit<f32>` has f32's layout, and the callee stores only
                // initialised f32s.
                let c = unsafe {
                    &mut *(self.c.as_mut_slice() as *mut [f32] as *mut [MaybeUninit<f32>])
                };
                gemm_bf16_at_b(*path, &self.a, Bf16Input::F32(&self.b), m, n, k, c, None)
            }
            None => gemm(self.shape, &self.a, &self.b, &mut self.c, 0.0),
        }
    }

    /// The operands as stored (`A` `m×k`, or `k×m` with `trans_a`; `B` likewise) and the output
    /// of the last run (`m×n`, row-major).
    pub fn operands_and_output(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.a, &self.b, &self.c)
    }

    /// Floating-point operations of one run (a multiply-add counts two).
    pub fn flops(&self) -> f64 {
        let s = self.shape;
        2.0 * s.m as f64 * s.n as f64 * s.k as f64
    }
}

/// `[CLS]` id of the BERT uncased vocabulary.
pub const CLS_ID: u32 = 101;
/// `[SEP]` id of the BERT uncased vocabulary.
pub const SEP_ID: u32 = 102;

/// `batch` sequences of exactly `seq` tokens: `[CLS]`, deterministic word ids, `[SEP]`; the mask is
/// all ones. Token `t` of sequence `b` (`0 < t < seq − 1`) is `1000 + (b·7919 + t·104729) mod 20000`
/// (`benches/compare/compare.py` builds the same ids).
pub fn synthetic_batch(batch: usize, seq: usize) -> Batch {
    let sequences: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..seq)
                .map(|t| match t {
                    0 => CLS_ID,
                    t if t + 1 == seq => SEP_ID,
                    t => 1000 + ((b * 7919 + t * 104_729) % 20_000) as u32,
                })
                .collect()
        })
        .collect();
    Batch::from_ids(&sequences)
}

/// Inference: pooled sentence embeddings of a synthetic batch with frozen weights.
pub struct ForwardWorkload {
    /// The model, frozen for inference.
    pub encoder: SentenceEncoder,
    /// The synthetic input batch.
    pub batch: Batch,
}

impl ForwardWorkload {
    /// The model's weights go to `device` once, its linear layers in `dtype`
    /// ([`Bert::set_linear_dtype`](scalpel_models::bert::Bert::set_linear_dtype)); each run
    /// sends the batch and reads back the embeddings, as an embedding request would.
    pub fn new(
        model: &Path,
        batch: usize,
        seq: usize,
        device: &Device,
        dtype: DType,
    ) -> BenchResult<ForwardWorkload> {
        let mut encoder = SentenceEncoder::load(model)?;
        check_seq(&encoder, seq)?;
        encoder.bert.set_linear_dtype(dtype)?;
        encoder.to_device(device)?;
        Ok(ForwardWorkload {
            encoder,
            batch: synthetic_batch(batch, seq),
        })
    }

    /// One forward plus pooling; returns the `[batch, hidden]` embeddings on the host.
    pub fn run(&self) -> BenchResult<Tensor> {
        let emb = self
            .encoder
            .embed_batch(&self.batch, &ForwardOptions::default())?;
        Ok(emb.value().to_host()?)
    }
}

fn check_seq(encoder: &SentenceEncoder, seq: usize) -> BenchResult {
    let limit = encoder.bert.config.max_position_embeddings;
    if seq < 2 || seq > limit {
        return Err(
            format!("--seq must be between 2 and {limit} (max_position_embeddings)").into(),
        );
    }
    Ok(())
}

/// Training: forward, pooled embedding, MSE against a fixed target, backward, AdamW over every
/// parameter the loss reaches (all of them, embeddings included), dropout 0.
pub struct TrainWorkload {
    /// The model, its parameters trainable.
    pub encoder: SentenceEncoder,
    /// The synthetic input batch.
    pub batch: Batch,
    /// The fixed embedding target of the MSE loss.
    pub target: Var,
    /// AdamW over every parameter.
    pub adam: Adam,
    /// The learning rate of each step.
    pub lr: f64,
    /// Loss of the last step.
    pub last_loss: f64,
}

/// Learning rate and weight decay of the benchmark's AdamW (the values `scalpel heal` defaults to
/// do not matter for speed; these match `benches/compare/compare.py`).
pub const TRAIN_LR: f64 = 1e-5;
/// AdamW's weight decay in the timed train step.
pub const TRAIN_WEIGHT_DECAY: f64 = 0.01;

impl TrainWorkload {
    /// Loads the model, removes the `drop` layers in memory (renumbering the rest), makes
    /// every float parameter trainable and moves the model to `device`.
    pub fn new(
        model: &Path,
        batch: usize,
        seq: usize,
        drop: &[usize],
        device: &Device,
    ) -> BenchResult<TrainWorkload> {
        let mut encoder = SentenceEncoder::load(model)?;
        check_seq(&encoder, seq)?;
        if !drop.is_empty() {
            let total = encoder.bert.num_layers();
            if let Some(bad) = drop.iter().find(|&&l| l >= total) {
                return Err(format!("layer {bad} is out of range: the model has {total}").into());
            }
            let kept: Vec<usize> = (0..total).filter(|l| !drop.contains(l)).collect();
            if kept.is_empty() {
                return Err("--drop would remove every encoder layer".into());
            }
            encoder.bert = keep_layers(&encoder.bert, &kept)?;
        }
        encoder.bert.params.unfreeze(|_| true);
        encoder.to_device(device)?;
        let hidden = encoder.bert.config.hidden_size;
        let target = Var::constant(device.place(&Tensor::from_vec(
            &[batch, hidden],
            synthetic_target(batch * hidden),
        )?)?);
        Ok(TrainWorkload {
            encoder,
            batch: synthetic_batch(batch, seq),
            target,
            adam: Adam::new(AdamConfig::adamw(TRAIN_WEIGHT_DECAY), decays_by_default),
            lr: TRAIN_LR,
            last_loss: f64::NAN,
        })
    }

    /// One optimisation step.
    pub fn step(&mut self) -> BenchResult {
        let pred = self
            .encoder
            .embed_batch(&self.batch, &ForwardOptions::default())?;
        let loss = ops::mse_loss(&pred, &self.target)?;
        self.last_loss = loss.value().to_vec::<f64>()[0];
        let grads = loss.backward()?;
        drop((loss, pred));
        self.adam
            .step(&mut self.encoder.bert.params, &grads, self.lr)?;
        Ok(())
    }
}

/// The fixed regression target: `0.05·sin(i)` (small, like unit-norm 384-d embeddings).
pub fn synthetic_target(len: usize) -> Vec<f32> {
    (0..len).map(|i| 0.05 * (i as f32).sin()).collect()
}
