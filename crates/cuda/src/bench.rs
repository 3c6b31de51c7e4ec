//! `scalpel bench kernels`: each kernel timed alone on device-resident inputs (CUDA events on a
//! GPU, the host clock on the emulator), with the work it does, so that achieved TFLOP/s or GB/s
//! can be read off; GEMMs beside cuBLAS on the same operands where cuBLAS is available.
//!
//! Inputs are uploaded once per case, outside the timed region; a case times `reps` launches and
//! reports the median of `samples` such timings, divided by `reps`.

use half::bf16;
use scalpel_tensor::cpu::attention::AttentionShape;
use scalpel_tensor::cpu::causal_attention::CausalAttentionShape;
use scalpel_tensor::cpu::gemm::{Activation, GemmShape};
use scalpel_tensor::cpu::layernorm::LayerNormShape;
use scalpel_tensor::cpu::rmsnorm::RmsNormShape;
use scalpel_tensor::cpu::rope::Rotation;

use crate::check::Inputs;
use crate::cublas::{Cublas, Precision};
use crate::kernels::adamw::{AdamStep, WeightDecay};
use crate::kernels::gemm::Epilogue;
use crate::kernels::rope::RopePositions;
use crate::kernels::{adamw, attention, embedding, gelu, gemm, layernorm, rmsnorm, rope, swiglu};
use crate::{DeviceBuffer, Result, Runtime};

/// What a kernel's time is measured against.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// Floating-point operations (a multiply-add counts two).
    Flops(f64),
    /// Bytes read and written in HBM, at least.
    Bytes(f64),
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelTiming {
    pub kernel: String,
    pub case: String,
    /// Median milliseconds per launch (per forward-and-backward pair for attention).
    pub ms: f64,
    pub work: Work,
    /// cuBLAS on the same shape and precision, median milliseconds (GEMMs on a GPU only).
    pub cublas_ms: Option<f64>,
}

impl KernelTiming {
    /// TFLOP/s or GB/s achieved.
    pub fn rate(&self) -> (f64, &'static str) {
        match self.work {
            Work::Flops(f) => (f / self.ms / 1e9, "TFLOP/s"),
            Work::Bytes(b) => (b / self.ms / 1e6, "GB/s"),
        }
    }
}

/// The shapes to time: `full` for a GPU (the shapes of `scripts/gpu_check.sh`), otherwise small
/// ones the scalar emulator finishes in seconds (so CI runs this code).
#[derive(Clone, Copy, Debug)]
pub struct BenchPlan {
    pub full: bool,
    pub samples: usize,
    pub reps: usize,
}

impl BenchPlan {
    pub fn for_runtime(rt: &Runtime) -> BenchPlan {
        if rt.is_emulator() {
            BenchPlan {
                full: false,
                samples: 3,
                reps: 1,
            }
        } else {
            BenchPlan {
                full: true,
                samples: 7,
                reps: 10,
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(rt: &Runtime, plan: &BenchPlan, mut launch: impl FnMut() -> Result<()>) -> Result<f64> {
    launch()?; // warm-up: module load, first-touch
    let samples = (0..plan.samples.max(1))
        .map(|_| {
            rt.time_ms(|| (0..plan.reps.max(1)).try_for_each(|_| launch()))
                .map(|ms| ms / plan.reps.max(1) as f64)
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(median(samples))
}

fn upload_random(rt: &Runtime, rng: &mut Inputs, n: usize) -> Result<DeviceBuffer<f32>> {
    rt.upload(&rng.uniform(n, -1.0, 1.0))
}

/// Times every kernel family on `rt`.
pub fn run(rt: &Runtime, plan: &BenchPlan) -> Result<Vec<KernelTiming>> {
    let mut out = Vec::new();
    let cublas = Cublas::new(rt).ok();
    gemms(rt, plan, cublas.as_ref(), &mut out)?;
    attention(rt, plan, &mut out)?;
    rowwise(rt, plan, &mut out)?;
    decoder(rt, plan, &mut out)?;
    Ok(out)
}

fn gemms(
    rt: &Runtime,
    plan: &BenchPlan,
    cublas: Option<&Cublas>,
    out: &mut Vec<KernelTiming>,
) -> Result<()> {
    let sizes: &[usize] = if plan.full {
        &[1024, 2048, 4096]
    } else {
        &[96, 160]
    };
    let mut rng = Inputs::new(1);
    for &n in sizes {
        // `x·Wᵀ`, the linear layer's layout.
        let s = GemmShape {
            m: n,
            n,
            k: n,
            trans_a: false,
            trans_b: true,
        };
        let work = Work::Flops(2.0 * (n * n * n) as f64);
        let case = format!("{n}x{n}x{n} nt");
        let (a, b) = (
            upload_random(rt, &mut rng, n * n)?,
            upload_random(rt, &mut rng, n * n)?,
        );
        let mut c = rt.uninit::<f32>(n * n)?;
        let ms = time(rt, plan, || {
            gemm::gemm(rt, s, &a, &b, &mut c, Epilogue::overwrite())
        })?;
        let reference = |precision| -> Result<Option<f64>> {
            let Some(blas) = cublas else { return Ok(None) };
            let mut c = rt.uninit::<f32>(n * n)?;
            Ok(Some(time(rt, plan, || {
                blas.gemm(precision, s, &a, &b, &mut c)
            })?))
        };
        out.push(KernelTiming {
            kernel: "gemm_f32".into(),
            case: case.clone(),
            ms,
            work,
            cublas_ms: reference(Precision::F32)?,
        });
        let tf32_reference = reference(Precision::Tf32)?;
        out.push(KernelTiming {
            kernel: "gemm_f32 (vs cuBLAS TF32)".into(),
            case: case.clone(),
            ms,
            work,
            cublas_ms: tf32_reference,
        });
        out.push(KernelTiming {
            kernel: "gemm_tf32".into(),
            case: case.clone(),
            ms: time(rt, plan, || {
                gemm::gemm_tf32(rt, s, &a, &b, &mut c, Epilogue::overwrite())
            })?,
            work,
            cublas_ms: tf32_reference,
        });
        let to_bf16 = |len: usize, rng: &mut Inputs| -> Result<DeviceBuffer<bf16>> {
            let v: Vec<bf16> = rng
                .uniform(len, -1.0, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            rt.upload(&v)
        };
        let (ah, bh) = (to_bf16(n * n, &mut rng)?, to_bf16(n * n, &mut rng)?);
        let ms = time(rt, plan, || {
            gemm::gemm_half(rt, s, &ah, &bh, &mut c, Epilogue::overwrite())
        })?;
        let cublas_ms = match cublas {
            Some(blas) => Some(time(rt, plan, || {
                blas.gemm(Precision::Bf16, s, &ah, &bh, &mut c)
            })?),
            None => None,
        };
        out.push(KernelTiming {
            kernel: "gemm_bf16".into(),
            case,
            ms,
            work,
            cublas_ms,
        });
    }
    ffn_up_projection(rt, plan, &mut rng, out)
}

/// MiniLM's FFN up-projection `GELU(x·Wᵀ + b)` in training (the pre-activation kept for the
/// backward): the GELU in the GEMM's epilogue, beside a GEMM and then the GELU kernel.
fn ffn_up_projection(
    rt: &Runtime,
    plan: &BenchPlan,
    rng: &mut Inputs,
    out: &mut Vec<KernelTiming>,
) -> Result<()> {
    let tokens = if plan.full { 4096 } else { 64 };
    let s = GemmShape {
        m: tokens,
        n: 1536,
        k: 384,
        trans_a: false,
        trans_b: true,
    };
    let (x, w, b) = (
        upload_random(rt, rng, s.m * s.k)?,
        upload_random(rt, rng, s.n * s.k)?,
        upload_random(rt, rng, s.n)?,
    );
    let (mut y, mut pre) = (rt.uninit(s.m * s.n)?, rt.uninit(s.m * s.n)?);
    let work = Work::Flops(2.0 * (s.m * s.n * s.k) as f64);
    let case = format!("{}x{}x{} nt bias", s.m, s.n, s.k);
    let fused = time(rt, plan, || {
        let ep = Epilogue {
            bias: Some(&b),
            beta: 0.0,
            activation: Activation::Gelu,
            pre_activation: Some(&mut pre),
        };
        gemm::gemm(rt, s, &x, &w, &mut y, ep)
    })?;
    let separate = time(rt, plan, || {
        gemm::gemm(rt, s, &x, &w, &mut pre, Epilogue::bias(Some(&b)))?;
        gelu::gelu_forward(rt, &pre, &mut y)
    })?;
    for (kernel, ms) in [
        ("gemm_f32 + GELU epilogue", fused),
        ("gemm_f32 + gelu_forward", separate),
    ] {
        out.push(KernelTiming {
            kernel: kernel.into(),
            case: case.clone(),
            ms,
            work,
            cublas_ms: None,
        });
    }
    Ok(())
}

fn attention(rt: &Runtime, plan: &BenchPlan, out: &mut Vec<KernelTiming>) -> Result<()> {
    let shapes: &[(usize, usize, usize, usize)] = if plan.full {
        &[(32, 12, 128, 32), (16, 32, 1024, 64)]
    } else {
        &[(2, 2, 32, 32), (1, 2, 48, 64)]
    };
    let mut rng = Inputs::new(2);
    for &(batch, heads, seq, head_dim) in shapes {
        let s = AttentionShape {
            batch,
            seq,
            heads,
            head_dim,
        };
        let n = batch * seq * heads * head_dim;
        let [q, k, v, dout] = [0; 4].map(|_| upload_random(rt, &mut rng, n));
        let (q, k, v, dout) = (q?, k?, v?, dout?);
        let mask = rt.upload(&vec![1.0f32; batch * seq])?;
        let mut o = rt.uninit::<f32>(n)?;
        let mut lse = rt.uninit::<f32>(batch * heads * seq)?;
        let (mut dq, mut dk, mut dv) = (rt.zeros(n)?, rt.zeros(n)?, rt.zeros(n)?);
        for causal in [false, true] {
            // QKᵀ and PV: 2·2·b·h·s²·d (the causal mask keeps s(s+1)/2 of the s² scores); the
            // backward recomputes P and does four such products.
            let scores = if causal {
                seq * (seq + 1) / 2
            } else {
                seq * seq
            };
            let pair = (batch * heads * scores * head_dim) as f64 * 2.0;
            let case = format!(
                "b{batch} h{heads} s{seq} d{head_dim}{}",
                if causal { " causal" } else { "" }
            );
            let forward = time(rt, plan, || {
                attention::attention_forward(rt, &s, &q, &k, &v, &mask, causal, &mut o, &mut lse)
            })?;
            out.push(KernelTiming {
                kernel: "attention_forward".into(),
                case: case.clone(),
                ms: forward,
                work: Work::Flops(2.0 * pair),
                cublas_ms: None,
            });
            let backward = time(rt, plan, || {
                attention::attention_backward(
                    rt, &s, &q, &k, &v, &mask, causal, &o, &lse, &dout, &mut dq, &mut dk, &mut dv,
                )
            })?;
            out.push(KernelTiming {
                kernel: "attention_backward".into(),
                case,
                ms: backward,
                work: Work::Flops(5.0 * pair),
                cublas_ms: None,
            });
        }
    }
    Ok(())
}

/// The memory-bound families: layernorm, GELU, embedding gather, AdamW.
fn rowwise(rt: &Runtime, plan: &BenchPlan, out: &mut Vec<KernelTiming>) -> Result<()> {
    let (rows, cols) = if plan.full { (4096, 384) } else { (64, 384) };
    let mut rng = Inputs::new(3);
    let n = rows * cols;
    let x = upload_random(rt, &mut rng, n)?;
    let gamma = upload_random(rt, &mut rng, cols)?;
    let beta = upload_random(rt, &mut rng, cols)?;
    let (mut y, mut mean, mut rstd) = (rt.uninit(n)?, rt.uninit(rows)?, rt.uninit(rows)?);
    let s = LayerNormShape {
        rows,
        cols,
        eps: 1e-12,
    };
    let f32_bytes = |count: usize| (count * 4) as f64;
    let ms = time(rt, plan, || {
        layernorm::layernorm_forward(
            rt, &s, &x, None, &gamma, &beta, &mut y, &mut mean, &mut rstd,
        )
    })?;
    out.push(KernelTiming {
        kernel: "layernorm_forward".into(),
        case: format!("{rows}x{cols}"),
        ms,
        work: Work::Bytes(f32_bytes(2 * n)),
        cublas_ms: None,
    });
    let residual = upload_random(rt, &mut rng, n)?;
    let mut sum = rt.uninit(n)?;
    let ms = time(rt, plan, || {
        layernorm::layernorm_forward(
            rt,
            &s,
            &x,
            Some((&residual, &mut sum)),
            &gamma,
            &beta,
            &mut y,
            &mut mean,
            &mut rstd,
        )
    })?;
    out.push(KernelTiming {
        kernel: "add_layernorm_forward".into(),
        case: format!("{rows}x{cols}"),
        ms,
        // x and the residual in; the sum and y out.
        work: Work::Bytes(f32_bytes(4 * n)),
        cublas_ms: None,
    });

    let wide = n * 4; // the FFN's intermediate activation
    let xw = upload_random(rt, &mut rng, wide)?;
    let mut yw = rt.uninit(wide)?;
    let ms = time(rt, plan, || gelu::gelu_forward(rt, &xw, &mut yw))?;
    out.push(KernelTiming {
        kernel: "gelu_forward".into(),
        case: format!("{rows}x{}", cols * 4),
        ms,
        work: Work::Bytes(f32_bytes(2 * wide)),
        cublas_ms: None,
    });

    let vocab = 30522;
    let table = upload_random(rt, &mut rng, vocab * cols)?;
    let ids: Vec<i32> = rng
        .below(rows, vocab)
        .into_iter()
        .map(|i| i as i32)
        .collect();
    let ids = rt.upload(&ids)?;
    let mut gathered = rt.uninit(n)?;
    let ms = time(rt, plan, || {
        embedding::embedding_forward(rt, cols, &table, &ids, &mut gathered)
    })?;
    out.push(KernelTiming {
        kernel: "embedding_forward".into(),
        case: format!("{rows} ids x {cols}"),
        ms,
        work: Work::Bytes(f32_bytes(2 * n)),
        cublas_ms: None,
    });

    // MiniLM-L6's 22.7 M parameters; a 256 K slice on the emulator.
    let params = if plan.full { 22_713_216 } else { 1 << 18 };
    let mut p = upload_random(rt, &mut rng, params)?;
    let g = upload_random(rt, &mut rng, params)?;
    let (mut m, mut v) = (rt.zeros(params)?, rt.zeros(params)?);
    let step = AdamStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        decay: WeightDecay::Decoupled,
        step: 1,
    };
    let mut table = adamw::AdamTables::default();
    let ms = time(rt, plan, || {
        let mut tensors = [adamw::AdamTensor {
            step,
            param: &mut p,
            grad: &g,
            m: &mut m,
            v: &mut v,
        }];
        adamw::adam_step(rt, &mut tensors, &mut table)
    })?;
    out.push(KernelTiming {
        kernel: "adamw_step".into(),
        case: format!("{params} parameters"),
        ms,
        // Reads p, g, m, v; writes p, m, v.
        work: Work::Bytes(f32_bytes(7 * params)),
        cublas_ms: None,
    });
    Ok(())
}

/// The Llama decoder's kernels at SmolLM2's shapes (hidden 576, 9 query heads over 3 key/value
/// heads of 64, FFN 1536): a 512-token prompt's causal attention forward and backward and one
/// decoding step's attention over its 512 cached keys, then RMSNorm, RoPE on the queries and
/// SwiGLU over the prompt's rows (memory-bound: bytes moved).
fn decoder(rt: &Runtime, plan: &BenchPlan, out: &mut Vec<KernelTiming>) -> Result<()> {
    let (tokens, hidden, heads, kv_heads, head_dim, ffn) = if plan.full {
        (512, 576, 9, 3, 64, 1536)
    } else {
        (40, 192, 3, 1, 64, 256)
    };
    let mut rng = Inputs::new(4);
    for q_len in [tokens, 1] {
        let s = CausalAttentionShape {
            batch: 1,
            q_len,
            kv_len: tokens,
            heads,
            kv_heads,
            head_dim,
        };
        let (q_n, kv_n) = (q_len * heads * head_dim, tokens * kv_heads * head_dim);
        let (q, k, v) = (
            upload_random(rt, &mut rng, q_n)?,
            upload_random(rt, &mut rng, kv_n)?,
            upload_random(rt, &mut rng, kv_n)?,
        );
        let mut o = rt.uninit::<f32>(q_n)?;
        let mut lse = rt.uninit::<f32>(heads * q_len)?;
        // Query row i sees (kv_len − q_len + i + 1) keys; QKᵀ and PV are 2·2·d flops per score.
        let scores: usize = (0..q_len).map(|i| tokens - q_len + i + 1).sum();
        let pair = (heads * scores * head_dim) as f64 * 2.0;
        let case = format!("q{q_len} kv{tokens} h{heads}/{kv_heads} d{head_dim}");
        let ms = time(rt, plan, || {
            attention::causal_attention_forward(rt, &s, (&q, &k, &v), &mut o, &mut lse)
        })?;
        out.push(KernelTiming {
            kernel: "causal_attention_forward".into(),
            case: case.clone(),
            ms,
            work: Work::Flops(2.0 * pair),
            cublas_ms: None,
        });
        if q_len == 1 {
            continue; // a decoding step has no backward
        }
        let dout = upload_random(rt, &mut rng, q_n)?;
        let (mut dq, mut dk, mut dv) = (rt.uninit(q_n)?, rt.uninit(kv_n)?, rt.uninit(kv_n)?);
        let ms = time(rt, plan, || {
            attention::causal_attention_backward(
                rt,
                &s,
                (&q, &k, &v),
                &o,
                &lse,
                &dout,
                &mut dq,
                &mut dk,
                &mut dv,
            )
        })?;
        out.push(KernelTiming {
            kernel: "causal_attention_backward".into(),
            case,
            ms,
            work: Work::Flops(5.0 * pair),
            cublas_ms: None,
        });
    }

    let f32_bytes = |count: usize| (count * 4) as f64;
    let n = tokens * hidden;
    let x = upload_random(rt, &mut rng, n)?;
    let w = upload_random(rt, &mut rng, hidden)?;
    let (mut y, mut rstd) = (rt.uninit(n)?, rt.uninit(tokens)?);
    let s = RmsNormShape {
        rows: tokens,
        cols: hidden,
        eps: 1e-5,
    };
    let ms = time(rt, plan, || {
        rmsnorm::rmsnorm_forward(rt, &s, &x, &w, &mut y, &mut rstd)
    })?;
    out.push(KernelTiming {
        kernel: "rmsnorm_forward".into(),
        case: format!("{tokens}x{hidden}"),
        ms,
        work: Work::Bytes(f32_bytes(2 * n)),
        cublas_ms: None,
    });

    let positions = RopePositions {
        seq: tokens,
        width: heads * head_dim,
        head_dim,
        position0: 0,
        theta: 1e5,
    };
    let nq = tokens * heads * head_dim;
    let xq = upload_random(rt, &mut rng, nq)?;
    let mut yq = rt.uninit(nq)?;
    let ms = time(rt, plan, || {
        rope::rope(rt, &positions, Rotation::Forward, &xq, &mut yq)
    })?;
    out.push(KernelTiming {
        kernel: "rope".into(),
        case: format!("{tokens}x{heads}x{head_dim}"),
        ms,
        work: Work::Bytes(f32_bytes(2 * nq)),
        cublas_ms: None,
    });

    let nf = tokens * ffn;
    let (gate, up) = (
        upload_random(rt, &mut rng, nf)?,
        upload_random(rt, &mut rng, nf)?,
    );
    let mut gated = rt.uninit(nf)?;
    let ms = time(rt, plan, || {
        swiglu::swiglu_forward(rt, &gate, &up, &mut gated)
    })?;
    out.push(KernelTiming {
        kernel: "swiglu_forward".into(),
        case: format!("{tokens}x{ffn}"),
        ms,
        work: Work::Bytes(f32_bytes(3 * nf)),
        cublas_ms: None,
    });
    Ok(())
}
