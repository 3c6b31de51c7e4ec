//! `scalpel new-head` on real SICK entailment data with the real all-MiniLM-L6-v2: a frozen
//! backbone stays bit-identical, the new head learns well above the majority-class rate, and a
//! wrong `--labels` is a clear error.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use scalpel::tensor::safetensors;

fn sick(name: &str) -> PathBuf {
    let file = repo().join("../shared/data/sts/sick2014").join(name);
    assert!(
        file.exists(),
        "{} is missing: the SICK data lives in ../shared",
        file.display()
    );
    file
}

/// The header and the first `n` pairs of a SICK file, written to `dest`.
fn subset(src: &Path, n: usize, dest: &Path) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let lines: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(dest, lines.join("\n") + "\n").unwrap();
    dest.to_owned()
}

fn scalpel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn frozen_backbone_head_learns_sick_entailment() {
    let dir = scratch("new_head_learns");
    let model = minilm_dir();
    let train = subset(&sick("SICK_train.txt"), 500, &dir.join("train.txt"));
    let eval = subset(&sick("SICK_trial.txt"), 300, &dir.join("eval.txt"));
    let out = dir.join("with_head");
    let run = scalpel(&[
        "new-head",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--eval",
        eval.to_str().unwrap(),
        "--labels",
        "3",
        "--output",
        out.to_str().unwrap(),
        "--freeze-backbone",
        "--epochs",
        "30",
        "--seed",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "new-head failed:\n{stderr}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("head.json")).unwrap()).unwrap();
    assert_eq!(
        report["labels"],
        serde_json::json!(["CONTRADICTION", "ENTAILMENT", "NEUTRAL"])
    );
    let (before, after, majority) = (
        report["accuracy_before"].as_f64().unwrap(),
        report["accuracy_after"].as_f64().unwrap(),
        report["majority_rate"].as_f64().unwrap(),
    );
    eprintln!("accuracy before {before:.4}, after {after:.4}, majority {majority:.4}");
    assert!(
        after >= majority + 0.08,
        "head did not learn: {after} vs majority {majority}\n{stderr}"
    );
    assert!(after > before + 0.05, "no improvement: {before} -> {after}");

    // The head: explicitly created, the declared shape.
    let head = safetensors::load(&out.join("head.safetensors"))
        .unwrap()
        .tensors;
    assert_eq!(
        head.keys().collect::<Vec<_>>(),
        ["classifier.bias", "classifier.weight"]
    );
    assert_eq!(head["classifier.weight"].shape(), [3, 4 * 384]);
    assert_eq!(head["classifier.bias"].shape(), [3]);

    // The frozen backbone is bit-identical, and the folder is complete.
    let original = safetensors::load(&model.join("model.safetensors"))
        .unwrap()
        .tensors;
    let written = safetensors::load(&out.join("model.safetensors"))
        .unwrap()
        .tensors;
    assert_eq!(
        original.keys().collect::<Vec<_>>(),
        written.keys().collect::<Vec<_>>()
    );
    for (name, t) in &original {
        let w = &written[name];
        assert_eq!(t.shape(), w.shape(), "{name}");
        assert!(
            t.to_dtype(w.dtype()).data().unwrap().as_bytes() == w.data().unwrap().as_bytes(),
            "{name} changed although the backbone was frozen"
        );
    }
    for file in ["tokenizer.json", "config.json", "modules.json"] {
        assert!(out.join(file).exists(), "{file} missing from the output");
    }
}

#[test]
fn labels_mismatch_is_a_clear_error() {
    let dir = scratch("new_head_labels");
    let model = minilm_dir();
    let train = subset(&sick("SICK_trial.txt"), 40, &dir.join("train.txt"));
    let out = dir.join("out");
    let run = scalpel(&[
        "new-head",
        "--model",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--eval",
        train.to_str().unwrap(),
        "--labels",
        "2",
        "--output",
        out.to_str().unwrap(),
        "--freeze-backbone",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("--labels is 2") && stderr.contains("3 distinct labels"),
        "unclear error: {stderr}"
    );
    assert!(!out.exists(), "nothing may be written on error");
}
