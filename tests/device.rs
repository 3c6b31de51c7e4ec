//! Device dispatch: the autograd ops and AdamW through the CUDA kernels (on the CPU emulator)
//! agree with the CPU path over two training steps of the real, cut MiniLM; and `--device` on
//! the command line fails clearly where CUDA is unusable and says what `auto` picked.

use crate::common;

use std::process::Command;
use std::time::Instant;

use scalpel::autograd::device::{with_device, Device};
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

/// Two AdamW steps of `student` towards `target` (MSE on the pooled, normalised embeddings),
/// every parameter trainable, gradients clipped; returns the losses and the trained model.
fn train(mut student: Bert, batch: &Batch, target: &Tensor) -> (Vec<f64>, Bert) {
    student.params.unfreeze(|_| true);
    let mut adam = Adam::new(AdamConfig::adamw(0.01), decays_by_default);
    let mask = Var::constant(batch.mask.clone());
    let target = Var::constant(target.clone());
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
    let (cpu_losses, cpu) = with_device(Device::Cpu, || train(student.clone(), &batch, &target));
    let cpu_time = start.elapsed();
    let start = Instant::now();
    let (emu_losses, emu) = with_device(Device::emulator(), || {
        train(student.clone(), &batch, &target)
    });
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
