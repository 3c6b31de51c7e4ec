//! Device dispatch: the autograd ops and AdamW through the CUDA kernels (on the CPU emulator)
//! agree with the CPU path over two training steps of the real, cut MiniLM; the runtime's
//! counters show that a heal step and an embed keep their data on the device; and `--device` on
//! the command line fails clearly where CUDA is unusable and says what `auto` picked.

use crate::common;

use std::process::Command;
use std::time::Instant;

use scalpel::autograd::device::{self, Device};
use scalpel::autograd::optim::{clip_grad_norm, decays_by_default, Adam, AdamConfig};
use scalpel::autograd::{ops, Var};
use scalpel::models::bert::{Bert, ForwardOptions};
use scalpel::models::sentence::SentenceEncoder;
use scalpel::models::tokenizer::Batch;
use scalpel::surgery::cut::keep_layers;
use scalpel::tensor::Tensor;

const SENTENCES: [&str; 4] = [
    "A man is playing a guitar.",
    "The cat sleeps.",
    "Stocks fell sharply today.",
    "Two dogs run in the park.",
];

/// The `--device` under test and its name: the GPU where scripts/gpu_check.sh says there is one
/// (`SCALPEL_EXPECT_GPU`), else the emulator. One test body, every device.
pub(crate) fn accelerator() -> (&'static str, Device) {
    if gpu_present() {
        (
            "cuda",
            device::cuda(0).expect("SCALPEL_EXPECT_GPU is set but CUDA is unusable"),
        )
    } else {
        ("emu", device::emulator())
    }
}

/// Two AdamW steps of `student` towards `target` (MSE on the pooled, normalised embeddings),
/// every parameter trainable, gradients clipped; returns the losses and the trained model.
fn train(mut student: Bert, batch: &Batch, target: &Tensor, on: &Device) -> (Vec<f64>, Bert) {
    student.to_device(on).unwrap();
    student.params.unfreeze(|_| true);
    let mut adam = Adam::new(AdamConfig::adamw(0.01), decays_by_default);
    let batch = batch.placed(on).unwrap();
    let batch = &batch;
    let mask = Var::constant(batch.mask.clone());
    let target = Var::constant(on.place(target).unwrap());
    let mut losses = Vec::new();
    for _ in 0..2 {
        let hidden = student.forward(batch, &ForwardOptions::default()).unwrap();
        let pooled = ops::l2_normalize(&ops::mean_pool(&hidden, &mask).unwrap()).unwrap();
        let loss = ops::mse_loss(&pooled, &target).unwrap();
        losses.push(loss.value().to_vec::<f64>()[0]);
        let mut grads = loss.backward().unwrap();
        // A limit below the gradient norm (about 5e-3 here), so the scaling runs too.
        let norm = clip_grad_norm(&mut grads, &student.params, 1e-3).unwrap();
        assert!(norm > 1e-3, "gradient norm {norm} would not be clipped");
        adam.step(&mut student.params, &grads, 1e-3).unwrap();
    }
    (losses, student)
}

#[test]
fn two_training_steps_on_the_emulator_match_the_cpu() {
    let teacher = SentenceEncoder::load(&common::minilm_dir()).unwrap();
    let batch = teacher.tokenizer.batch(&SENTENCES).unwrap();
    // The 6-layer teacher's embeddings, on the CPU, are the target of both runs.
    let target = teacher
        .embed_batch(&batch, &ForwardOptions::default())
        .unwrap();
    let target = target.value().clone();
    let student = keep_layers(&teacher.bert, &[0, 1]).unwrap();

    let start = Instant::now();
    let (cpu_losses, cpu) = train(student.clone(), &batch, &target, &Device::Cpu);
    let cpu_time = start.elapsed();
    let start = Instant::now();
    let emu_device = accelerator().1;
    let (emu_losses, emu) = train(student.clone(), &batch, &target, &emu_device);
    eprintln!(
        "cpu {cpu_time:?}, emulator {:?}; losses cpu {cpu_losses:?} emu {emu_losses:?}",
        start.elapsed()
    );

    assert!(cpu_losses[1] < cpu_losses[0], "{cpu_losses:?}");
    for (c, e) in cpu_losses.iter().zip(&emu_losses) {
        assert!(
            (c - e).abs() <= 1e-4 * c.abs(),
            "losses {cpu_losses:?} vs {emu_losses:?}"
        );
    }
    let mut compared = 0;
    let mut moved = 0;
    for ((name, c), (name_e, e)) in cpu.params.iter().zip(emu.params.iter()) {
        assert_eq!(name, name_e);
        let want = if c.value().dtype() == scalpel::tensor::DType::F32 {
            emu_device.clone()
        } else {
            Device::Cpu // integer constants stay on the host
        };
        assert_eq!(e.value().device(), want, "{name}");
        let (c, e) = (c.value().to_vec::<f64>(), e.value().to_vec::<f64>());
        let norm = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = c
            .iter()
            .zip(&e)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(diff <= 1e-4 * norm, "{name}: ‖Δ‖/‖p‖ = {:e}", diff / norm);
        let before = student.params.get(name).unwrap().value().to_vec::<f64>();
        if before != c {
            moved += 1;
        }
        compared += 1;
    }
    // 5 embedding tensors (position_ids is an integer constant, compared too) + 2 layers × 16.
    assert!(compared >= 5 + 2 * 16, "{compared} tensors compared");
    assert!(
        moved >= 5 + 2 * 16,
        "only {moved} tensors changed in training"
    );
}

fn scalpel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .unwrap()
}

/// A 1-layer cut of MiniLM (layer 0), written once per test run, for the command-line tests on
/// the emulator (scalar, so the smallest real model keeps them fast).
fn one_layer_model() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::scratch("device_cut1").join("model");
        let out = scalpel(&[
            "cut",
            "--model",
            common::minilm_dir().to_str().unwrap(),
            "--output",
            dir.to_str().unwrap(),
            "--keep",
            "0",
            "--force",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .clone()
}

pub(crate) fn stats_of(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub(crate) fn count(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn a_heal_step_on_the_emulator_keeps_its_data_on_the_device() {
    // Every loss and dropout run on the device: nothing else crosses the bus.
    for (loss, dropout) in [("mse", "0"), ("cosine", "0.1")] {
        heal_keeps_its_data_on_the_device(loss, dropout);
    }
}

fn heal_keeps_its_data_on_the_device(loss: &str, dropout: &str) {
    let model = one_layer_model();
    let dir = common::scratch(&format!("device_heal_{loss}"));
    let data = dir.join("train.txt");
    std::fs::write(&data, SENTENCES.join("\n")).unwrap();
    let (log, stats) = (dir.join("log.jsonl"), dir.join("stats.json"));
    let (flag, accel) = accelerator();
    let out = scalpel(&[
        "--device",
        flag,
        "--device-stats",
        stats.to_str().unwrap(),
        "heal",
        "--student",
        model.to_str().unwrap(),
        "--teacher",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        dir.join("healed").to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--clip",
        "1",
        "--loss",
        loss,
        "--dropout",
        dropout,
        // The 30522-row token table's Adam update is most of a step on the scalar emulator.
        "--freeze",
        "word_embeddings",
        "--log",
        log.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 3);
    let tokenizer = SentenceEncoder::load(&model).unwrap().tokenizer;
    let batch = tokenizer.batch(&SENTENCES).unwrap();
    let tokens = (batch.batch * batch.seq) as u64;
    // The tensors AdamW trained: one `.step` entry each in the checkpoint's optimiser state.
    let optimiser = dir
        .join("healed")
        .join(scalpel::surgery::heal::OPTIMIZER_STATE_FILE);
    let trained = scalpel::tensor::safetensors::load(&optimiser)
        .unwrap()
        .tensors
        .keys()
        .filter(|k| k.ends_with(".step"))
        .count() as u64;
    assert_eq!(
        trained,
        4 + 16,
        "embeddings but the frozen tokens, one layer"
    );
    for (i, step) in steps.iter().enumerate() {
        let d = &step["device"];
        eprintln!("{loss} step {}: {d}", i + 1);
        if i == 0 {
            continue; // the first step fills the allocator's cache and creates the moments
        }
        assert_eq!(count(d, "driver_allocs"), 0, "{loss} step {}: {d}", i + 1);
        // The batch's ids and mask (4 bytes a token each), once for both forwards and the
        // backward (position ids and token types are made on the device), and the addresses of
        // the step's gradients for the multi-tensor AdamW launch (8 bytes a trained tensor).
        // Nothing else: no weight, activation, gradient or moment.
        let expected = 2 * 4 * tokens + 8 * trained;
        assert_eq!(
            count(d, "h2d_bytes"),
            expected,
            "{loss} step {}: {d} (ids, mask and gradient table: {expected} bytes)",
            i + 1
        );
        // The loss and the gradient norm.
        assert!(count(d, "d2h_bytes") <= 64, "{loss} step {}: {d}", i + 1);
    }
    let total = stats_of(&stats);
    assert_eq!(total["device"], accel.name());
    assert!(count(&total, "peak_device_bytes") > 0, "{total}");
}

#[test]
fn an_embed_on_the_emulator_uploads_the_weights_once() {
    let model = one_layer_model();
    let dir = common::scratch("device_embed");
    let input = dir.join("in.txt");
    let lines: Vec<String> = (0..8)
        .map(|i| format!("{} {i}", SENTENCES[i % 4]))
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let run = |device: &str, output: &std::path::Path, stats: &std::path::Path| {
        let out = scalpel(&[
            "--device",
            device,
            "--device-stats",
            stats.to_str().unwrap(),
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--batch-size",
            "2",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(output).unwrap()
    };
    let (emu_out, cpu_out) = (dir.join("emu.jsonl"), dir.join("cpu.jsonl"));
    let emu = run(accelerator().0, &emu_out, &dir.join("emu.json"));
    let cpu = run("cpu", &cpu_out, &dir.join("cpu.json"));
    let stats = stats_of(&dir.join("emu.json"));
    eprintln!("embed of 4 batches on the emulator: {stats}");
    let weights: u64 = SentenceEncoder::load(&model)
        .unwrap()
        .bert
        .params
        .iter()
        .filter(|(_, v)| v.value().dtype() == scalpel::tensor::DType::F32)
        .map(|(_, v)| 4 * v.value().numel() as u64)
        .sum();
    let h2d = count(&stats, "h2d_bytes");
    assert!(h2d >= weights, "{h2d} < the weights' {weights} bytes");
    assert!(
        h2d < weights + 16 * 1024,
        "{h2d}: more than the weights once plus the batches"
    );
    // Back: 8 embeddings of 384 floats, and nothing else.
    assert_eq!(count(&stats, "d2h_bytes"), 8 * 384 * 4, "{stats}");
    // The same embeddings as the CPU's.
    for (e, c) in emu.lines().zip(cpu.lines()) {
        let e: serde_json::Value = serde_json::from_str(e).unwrap();
        let c: serde_json::Value = serde_json::from_str(c).unwrap();
        let (e, c) = (
            e["embedding"].as_array().unwrap(),
            c["embedding"].as_array().unwrap(),
        );
        let dot: f64 = e
            .iter()
            .zip(c)
            .map(|(a, b)| a.as_f64().unwrap() * b.as_f64().unwrap())
            .sum();
        assert!(dot > 0.99999, "cosine {dot}");
    }
    assert_eq!(stats_of(&dir.join("cpu.json"))["device"], "cpu");
}

/// Whether this machine has a usable GPU, as the probe that `--device auto` uses sees it (a run
/// that sets `SCALPEL_EXPECT_GPU` fails instead when the probe finds none).
fn gpu_present() -> bool {
    let ready = scalpel::cuda::probe().gpu_ready();
    assert!(
        ready || std::env::var_os("SCALPEL_EXPECT_GPU").is_none(),
        "a GPU was expected: {:?}",
        scalpel::cuda::probe().missing
    );
    ready
}

fn one_line_input(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = common::scratch(name);
    let input = dir.join("in.txt");
    std::fs::write(&input, "A sentence to embed.\n").unwrap();
    (input, dir.join("out.jsonl"))
}

#[test]
fn device_cuda_without_a_gpu_fails_naming_what_is_missing() {
    if gpu_present() {
        return; // On a GPU machine `--device cuda` is expected to work.
    }
    let (input, output) = one_line_input("device_cuda");
    let model = common::minilm_dir();
    let out = scalpel(&[
        "--device",
        "cuda",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--device cuda succeeded:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("CUDA driver library (libcuda.so)"),
        "{stderr}"
    );
    assert!(!output.exists(), "an output was written");
}

#[test]
fn device_auto_says_it_picked_the_cpu_and_matches_device_cpu() {
    let (input, output) = one_line_input("device_auto");
    let model = common::minilm_dir();
    let embed = |device: &str, output: &std::path::Path| {
        let out = scalpel(&[
            "--device",
            device,
            "--verbose",
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "--device {device}:\n{stderr}");
        (stderr, std::fs::read_to_string(output).unwrap())
    };
    let (stderr, auto) = embed("auto", &output);
    if gpu_present() {
        assert!(stderr.contains("device: cuda ("), "{stderr}");
        return;
    }
    let line = stderr
        .lines()
        .find(|l| l.starts_with("device: "))
        .unwrap_or_else(|| panic!("no device line:\n{stderr}"));
    assert!(line.starts_with("device: cpu (no CUDA: "), "{line}");
    assert!(line.contains("libcuda.so"), "{line}");
    let (stderr, cpu) = embed("cpu", &output.with_extension("cpu"));
    assert!(stderr.contains("device: cpu\n"), "{stderr}");
    assert_eq!(auto, cpu);
    // Without --verbose: one short line, and none at all for a command that runs no model.
    let quiet = scalpel(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.with_extension("quiet").to_str().unwrap(),
    ]);
    let quiet = String::from_utf8_lossy(&quiet.stderr).into_owned();
    assert!(
        quiet.contains("device: cpu (no usable GPU; --verbose says why)\n"),
        "{quiet}"
    );
    assert!(!quiet.contains("libcuda"), "{quiet}");
    let inspect = scalpel(&["inspect", "--model", model.to_str().unwrap()]);
    assert!(inspect.status.success());
    assert!(!String::from_utf8_lossy(&inspect.stderr).contains("device:"));
    let bad = scalpel(&[
        "--device",
        "tpu",
        "inspect",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown device `tpu`"));
}

#[test]
fn bench_kernels_times_every_family_on_the_emulator() {
    let out = scalpel(&["--device", "emu", "bench", "kernels", "--json"]);
    // (On a GPU, scripts/gpu_check.sh runs `bench kernels --device cuda` at full size itself.)
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let kernels: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["kernel"].as_str().unwrap()).collect();
    for family in [
        "gemm_f32",
        "gemm_bf16",
        "attention_forward",
        "attention_backward",
        "layernorm_forward",
        "gelu_forward",
        "embedding_forward",
        "adamw_step",
        "causal_attention_forward",
        "causal_attention_backward",
        "rmsnorm_forward",
        "rope",
        "swiglu_forward",
    ] {
        assert!(
            kernels.contains(family),
            "{family} missing from {kernels:?}"
        );
    }
    for r in &rows {
        let ms = r["ms"].as_f64().unwrap();
        assert!(ms.is_finite() && ms > 0.0, "{r}");
        // No cuBLAS on the emulator: the reference column is empty, not invented.
        assert!(r["cublas_ms"].is_null(), "{r}");
    }
    let cpu = scalpel(&["--device", "cpu", "bench", "kernels"]);
    assert!(!cpu.status.success());
    assert!(String::from_utf8_lossy(&cpu.stderr).contains("--device cuda or --device emu"));
}
