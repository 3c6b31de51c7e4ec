//! `scalpel heal` on a Llama decoder: distillation of the teacher's next-token distributions
//! lowers the loss, the loss is what it says (zero against itself, the text's cross-entropy at
//! `--lm-weight 1`, a linear mix in between), an interrupted run resumes bit for bit, a NaN
//! stops it with the last checkpoint intact, and bad flags are errors naming the problem. A
//! 2-layer cut of SmolLM2 and windows of 16 tokens keep each run to seconds.

use crate::common::{self, scratch};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use scalpel::autograd::optim::Schedule;
use scalpel::models::llama::{Llama, LlamaCheckpoint};
use scalpel::surgery::decoder::{calibration_perplexity, DecoderCalibration};
use scalpel::surgery::decoder_heal::{
    batch_loss, heal_decoder, DecoderData, DecoderHealRun, DecoderLoss,
};
use scalpel::surgery::heal::{Budget, HealOptions};

fn scalpel() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalpel"));
    cmd.args(["--device", "cpu", "--threads", "2"]);
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// A 2-layer student (layers 0 and 28 of SmolLM2: with layer 29 instead, the cut's logits are so
/// far off that the text's cross-entropy overflows) and a few hundred tokens of text.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let student = dir.join("student");
    run_ok(
        scalpel()
            .args(["cut", "--keep", "0,28", "--model"])
            .arg(common::smollm2_gguf())
            .arg("--output")
            .arg(&student),
    );
    let text = dir.join("text.txt");
    std::fs::write(&text, sample_text()).unwrap();
    (student, text)
}

fn sample_text() -> String {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("llama/tokens.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = fixture
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|case| case["text"].as_str())
        .filter(|t| t.len() > 200)
        .take(4)
        .collect();
    texts.join("\n")
}

fn load(path: &Path) -> (LlamaCheckpoint, Llama) {
    let mut checkpoint = LlamaCheckpoint::load(path).unwrap();
    let model = checkpoint.model(path).unwrap();
    (checkpoint, model)
}

fn losses(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("training_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn options(steps: usize, lr: f64) -> HealOptions {
    HealOptions {
        budget: Budget {
            steps: Some(steps),
            ..Budget::default()
        },
        batch_size: 2,
        lr,
        weight_decay: 0.01,
        dropout: 0.0,
        shuffle: true,
        seed: 3,
        freeze: vec!["model.embed_tokens".into()],
        schedule: Schedule::Constant,
        warmup: 0,
        clip: Some(1.0),
        precision: Default::default(),
        group_by_length: false,
    }
}

#[test]
fn distillation_lowers_the_loss_of_a_repeated_batch() {
    let dir = scratch("decoder-heal-lowers");
    let (student_dir, text) = setup(&dir);
    let (mut files, mut student) = load(&student_dir);
    let (_, teacher) = load(&common::smollm2_gguf());
    let ids = files
        .tokenizer
        .encode(std::fs::read_to_string(&text).unwrap(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    // Two windows: every step sees the same batch, so the log compares like with like.
    let data = DecoderData::from_ids(&ids[..33], 16).unwrap();
    assert_eq!(data.windows.len(), 2);
    let outcome = heal_decoder(
        DecoderHealRun {
            student: &mut student,
            files: &mut files,
            teacher: Some(&teacher),
            data: &data,
            loss: DecoderLoss {
                temperature: 2.0,
                lm_weight: 0.0,
            },
            opts: &options(8, 1e-3),
            checkpoint: None,
            extra_files: &[],
            eval: None,
            eval_every: None,
            resume: None,
            stop: None,
            invocation: serde_json::Value::Null,
        },
        |_| Ok(()),
    )
    .unwrap();
    let log: Vec<f64> = outcome.log.iter().map(|l| l.loss).collect();
    assert_eq!(log.len(), 8);
    assert!(
        log[0] > 0.1,
        "a 2-layer cut should differ from the teacher: {log:?}"
    );
    assert!(
        log[7] < 0.7 * log[0],
        "7 AdamW steps on one batch should cut its loss by 30 %: {log:?}"
    );
    // The trained weights are what the model now runs.
    let after = batch_loss(
        &student,
        Some(&teacher),
        &data,
        &[0, 1],
        DecoderLoss {
            temperature: 2.0,
            lm_weight: 0.0,
        },
    )
    .unwrap()
    .value()
    .to_vec::<f64>()[0];
    assert!(after < 0.7 * log[0], "{after} vs {log:?}");
}

#[test]
fn the_loss_is_zero_against_itself_the_text_cross_entropy_at_lm_weight_1_and_mixes_linearly() {
    let dir = scratch("decoder-heal-loss");
    let (student_dir, text) = setup(&dir);
    let (files, student) = load(&student_dir);
    let (_, same) = load(&student_dir);
    let (_, teacher) = load(&common::smollm2_gguf());
    let ids = files
        .tokenizer
        .encode(std::fs::read_to_string(&text).unwrap(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    let data = DecoderData::from_ids(&ids, 16).unwrap();
    let batch = [0, 2, 3];
    let loss = |teacher: &Llama, temperature: f64, lm_weight: f64| {
        batch_loss(
            &student,
            Some(teacher),
            &data,
            &batch,
            DecoderLoss {
                temperature,
                lm_weight,
            },
        )
        .unwrap()
        .value()
        .to_vec::<f64>()[0]
    };
    for t in [1.0, 2.0] {
        let kl = loss(&same, t, 0.0);
        assert!(
            kl.abs() < 1e-6,
            "KL of a model against itself at T={t}: {kl}"
        );
    }
    // At --lm-weight 1 the loss is the mean next-token negative log-likelihood of the windows,
    // which is what calibration perplexity measures on windows of the same 17 tokens.
    let ce = loss(&teacher, 2.0, 1.0);
    let windows = DecoderCalibration {
        windows: batch.iter().map(|&i| data.windows[i].clone()).collect(),
    };
    let ppl = calibration_perplexity(&student, &windows).unwrap();
    assert!(
        (ce - ppl.ln()).abs() < 1e-5 * ce,
        "cross-entropy {ce} vs ln(perplexity) {}",
        ppl.ln()
    );
    let kl = loss(&teacher, 2.0, 0.0);
    assert!(kl > 0.1, "the 2-layer cut differs from the teacher: {kl}");
    let mixed = loss(&teacher, 2.0, 0.25);
    assert!(
        (mixed - (0.75 * kl + 0.25 * ce)).abs() < 1e-6 * mixed,
        "{mixed} vs 0.75·{kl} + 0.25·{ce}"
    );
}

fn heal_args(student: &Path, text: &Path, output: &Path, lr: &str, every: &str) -> Command {
    let mut cmd = scalpel();
    cmd.arg("heal")
        .arg("--student")
        .arg(student)
        .arg("--teacher")
        .arg(common::smollm2_gguf())
        .arg("--data")
        .arg(text)
        .arg("--output")
        .arg(output)
        .args(["--steps", "8", "--batch-size", "2", "--window-tokens", "16"])
        .args([
            "--lr",
            lr,
            "--schedule",
            "linear",
            "--warmup",
            "2",
            "--seed",
            "5",
        ])
        .args(["--temperature", "2", "--lm-weight", "0.1", "--clip", "1"])
        .args(["--checkpoint-every", every])
        // The 49152-row token table (and so the tied LM head) frozen keeps the checkpoints small.
        .args(["--freeze", "model.embed_tokens"]);
    cmd
}

#[test]
fn an_interrupted_decoder_heal_resumes_to_the_uninterrupted_losses_and_weights() {
    let dir = scratch("decoder-heal-resume");
    let (student, text) = setup(&dir);
    let straight = dir.join("straight");
    let held_out = dir.join("held-out.txt");
    std::fs::write(&held_out, &sample_text()[..300]).unwrap();
    let out = run_ok(
        heal_args(&student, &text, &straight, "1e-3", "3")
            .arg("--eval")
            .arg(&held_out)
            .args(["--eval-context", "32"]),
    );
    let expected = losses(&straight);
    assert_eq!(expected.len(), 8);
    assert!(out.contains("held-out perplexity"), "{out}");
    // A complete Hugging Face folder plus the trainer's state, and the cut's record.
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "surgery.json",
    ] {
        assert!(straight.join(file).is_file(), "{file} missing");
    }
    let (_, healed) = load(&straight);
    assert_eq!(healed.config.num_hidden_layers, 2);

    let resumed = dir.join("resumed");
    let mut child = heal_args(&student, &text, &resumed, "1e-3", "3")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "run ended before step 3"
        );
        if line.contains("checkpoint at step 3") {
            break;
        }
    }
    let signalled = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let rest: String = stderr.lines().map(|l| l.unwrap() + "\n").collect();
    assert_eq!(child.wait().unwrap().code(), Some(130), "{rest}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("trainer_state.json")).unwrap())
            .unwrap();
    let stopped_at = state["step"].as_u64().unwrap() as usize;
    assert!((3..8).contains(&stopped_at), "stopped at {stopped_at}");
    assert_eq!(losses(&resumed), expected[..stopped_at]);

    run_ok(scalpel().args(["heal", "--resume"]).arg(&resumed));
    assert_eq!(losses(&resumed), expected, "resumed losses differ");
    assert_eq!(
        std::fs::read(resumed.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap(),
        "resumed weights differ"
    );
}

#[test]
fn a_nan_loss_stops_the_decoder_heal_and_keeps_the_last_checkpoint() {
    let dir = scratch("decoder-heal-nan");
    let (student, text) = setup(&dir);
    let output = dir.join("out");
    // A learning rate this large overflows the activations at step 2, after the step-1 checkpoint.
    let err = run_err(&mut heal_args(&student, &text, &output, "1e30", "1"));
    assert!(
        err.contains("became") && err.contains("last checkpoint is intact"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("trainer_state.json")).unwrap())
            .unwrap();
    let saved = state["step"].as_u64().unwrap() as usize;
    assert!(saved >= 1);
    let log = losses(&output);
    assert_eq!(log.len(), saved);
    assert!(log.iter().all(|(_, l)| l.is_finite()));
    // It loads: the loader refuses NaN or infinite weights.
    load(&output);
}

#[test]
fn decoder_heal_refuses_bad_flags_and_an_existing_output() {
    let dir = scratch("decoder-heal-bad");
    let (student, text) = setup(&dir);
    let output = dir.join("out");
    std::fs::create_dir_all(&output).unwrap();
    let err = run_err(&mut heal_args(&student, &text, &output, "1e-3", "1"));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    std::fs::remove_dir_all(&output).unwrap();
    let err = run_err(&mut heal_args(&student, &text, &output, "nan", "1"));
    assert!(err.contains("--lr") && err.contains("finite"), "{err}");
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--lm-weight", "1.5"], &["--lm-weight", "[0, 1]"]),
        (
            &["--group-by-length"],
            &["--group-by-length", "same length"],
        ),
        (&["--dropout", "0.1"], &["--dropout", "no dropout"]),
        (&["--loss", "cosine"], &["--loss", "encoders"]),
        (&["--window-tokens", "4096"], &["not one window of 4096"]),
    ];
    for (flags, needles) in cases {
        let err = run_err(
            scalpel()
                .arg("heal")
                .arg("--student")
                .arg(&student)
                .arg("--teacher")
                .arg(common::smollm2_gguf())
                .arg("--data")
                .arg(&text)
                .arg("--output")
                .arg(&output)
                .args(["--steps", "1"])
                .args(flags),
        );
        for needle in needles {
            assert!(err.contains(needle), "{flags:?}: `{err}` lacks `{needle}`");
        }
        assert!(!output.exists(), "{flags:?} wrote an output");
    }
    // Without a teacher a decoder can only learn the text itself.
    let err = run_err(
        scalpel()
            .arg("heal")
            .arg("--student")
            .arg(&student)
            .arg("--data")
            .arg(&text)
            .arg("--output")
            .arg(&output),
    );
    assert!(
        err.contains("--teacher") && err.contains("--lm-weight 1"),
        "{err}"
    );
    // Decoder flags on an encoder say so.
    let err = run_err(
        scalpel()
            .arg("heal")
            .arg("--student")
            .arg(common::minilm_dir())
            .arg("--teacher")
            .arg(common::minilm_dir())
            .arg("--data")
            .arg(&text)
            .arg("--output")
            .arg(&output)
            .args(["--temperature", "2"]),
    );
    assert!(err.contains("--temperature is for Llama decoders"), "{err}");
}
