//! `heal` stopped by Ctrl-C saves a checkpoint; `heal --resume` continues it and reproduces the
//! uninterrupted run's losses exactly. A NaN stop leaves the last checkpoint intact.

use crate::common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

fn scalpel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 2-layer student cut from the real model, and 40 real sentences.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let student = dir.join("student");
    run_ok(
        scalpel()
            .args(["cut", "--keep", "0,1", "--model"])
            .arg(minilm_dir())
            .arg("--output")
            .arg(&student),
    );
    let data = dir.join("sentences.txt");
    std::fs::write(&data, fixture_sentences()[..40].join("\n")).unwrap();
    (student, data)
}

fn heal_args(
    student: &Path,
    data: &Path,
    output: &Path,
    lr: &str,
    checkpoint_every: &str,
) -> Command {
    let mut cmd = scalpel();
    cmd.args(["--threads", "2", "heal", "--student"])
        .arg(student)
        .arg("--teacher")
        .arg(minilm_dir())
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(output)
        .args([
            "--steps",
            "12",
            "--batch-size",
            "4",
            "--lr",
            lr,
            "--seed",
            "7",
        ])
        .args([
            "--schedule",
            "linear",
            "--warmup",
            "2",
            "--checkpoint-every",
            checkpoint_every,
            // The 30522-row token table frozen keeps each checkpoint small (no Adam state for
            // it) without changing what is tested: every other tensor trains and resumes.
            "--freeze",
            "word_embeddings",
        ]);
    cmd
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

#[test]
fn interrupted_and_resumed_run_reproduces_the_uninterrupted_losses() {
    let dir = scratch("heal_resume");
    let (student, data) = setup(&dir);

    let straight = dir.join("straight");
    run_ok(&mut heal_args(&student, &data, &straight, "2e-4", "3"));
    let expected = losses(&straight);
    assert_eq!(expected.len(), 12);
    // The teacher's embeddings the run kept (and the checkpoint carries for the resume below)
    // are the teacher's embeddings of those sentences: 12 steps of 4 drew all 40.
    let kept = scalpel::tensor::safetensors::load(
        &straight.join(scalpel::surgery::teacher_targets::TEACHER_TARGETS_FILE),
    )
    .unwrap()
    .tensors;
    let indices = kept["indices"].to_vec::<i64>();
    assert_eq!(indices, (0..40).collect::<Vec<i64>>());
    let teacher = scalpel::models::sentence::SentenceEncoder::load(&minilm_dir()).unwrap();
    let embedded = teacher.embed(&fixture_sentences()[..40], 8).unwrap();
    let diff = max_abs_diff(
        &kept["embeddings"].to_vec::<f32>(),
        &embedded.to_vec::<f32>(),
    );
    assert!(
        diff < 1e-5,
        "kept targets differ from the teacher's embeddings by {diff}"
    );

    // Interrupt once the step-3 checkpoint is on disk.
    let resumed = dir.join("resumed");
    let mut child = heal_args(&student, &data, &resumed, "2e-4", "3")
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
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest}");
    assert!(rest.contains("--resume"), "{rest}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("trainer_state.json")).unwrap())
            .unwrap();
    let stopped_at = state["step"].as_u64().unwrap();
    assert!((3..12).contains(&stopped_at), "stopped at {stopped_at}");
    assert_eq!(state["finished"], false);
    assert_eq!(losses(&resumed), expected[..stopped_at as usize]);

    run_ok(
        scalpel()
            .args(["--threads", "2", "heal", "--resume"])
            .arg(&resumed),
    );
    assert_eq!(losses(&resumed), expected, "resumed losses differ");
    // The same weights, bit for bit.
    assert_eq!(
        std::fs::read(resumed.join("model.safetensors")).unwrap(),
        std::fs::read(straight.join("model.safetensors")).unwrap()
    );
}

#[test]
fn nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let dir = scratch("heal_nan");
    let (student, data) = setup(&dir);
    let output = dir.join("out");
    // A learning rate this large overflows the activations at step 2, after the step-1 checkpoint.
    let out = heal_args(&student, &data, &output, "1e30", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("became") && err.contains("last checkpoint is intact"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("trainer_state.json")).unwrap())
            .unwrap();
    let saved = state["step"].as_u64().unwrap() as usize;
    let log = losses(&output);
    assert_eq!(log.len(), saved);
    assert!(log.iter().all(|(_, l)| l.is_finite()));
    // The checkpoint still loads, and no NaN or infinity was ever written into it.
    let model = scalpel::models::bert::Bert::load(&output).unwrap();
    for (name, var) in model.params.iter() {
        let values = var.value().to_vec::<f64>();
        assert!(values.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
}
