//! Training parity with PyTorch through the CLI (fixtures: tests/fixtures/heal/, made by
//! scripts/reference/make_fixtures.py): cut layers 4 and 5 of MiniLM, distil for 5 AdamW steps,
//! and compare every logged loss and every trained parameter.

use crate::common;

use std::process::Command;

use common::*;
use scalpel::tensor::safetensors;

fn scalpel(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scalpel {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn five_adamw_steps_match_pytorch() {
    let model = minilm_dir();
    let dir = scratch("heal_parity");
    let (student, healed, data, log) = (
        dir.join("cut"),
        dir.join("healed"),
        dir.join("data.txt"),
        dir.join("log.jsonl"),
    );
    std::fs::write(&data, fixture_sentences()[..40].join("\n")).unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    scalpel(&[
        "cut",
        "--model",
        &s(&model),
        "--drop",
        "4,5",
        "--output",
        &s(&student),
    ]);
    scalpel(&[
        "heal",
        "--student",
        &s(&student),
        "--teacher",
        &s(&model),
        "--data",
        &s(&data),
        "--output",
        &s(&healed),
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--lr",
        "1e-4",
        "--weight-decay",
        "0.01",
        "--loss",
        "mse",
        "--dropout",
        "0",
        "--no-shuffle",
        "--log",
        &s(&log),
    ]);

    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("heal/losses.json")).unwrap())
            .unwrap();
    let expected: Vec<f64> = serde_json::from_value(expected["losses"].clone()).unwrap();
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(logged.len(), 5);
    for (k, (line, want)) in logged.iter().zip(&expected).enumerate() {
        assert_eq!(line["step"], k + 1);
        let got = line["loss"].as_f64().unwrap();
        let rel = (got - want).abs() / want.abs();
        assert!(
            rel <= 1e-4,
            "step {}: loss {got:e} vs PyTorch {want:e} (relative {rel:e} > 1e-4)",
            k + 1
        );
    }

    // Every trained parameter: ‖ours − torch‖ / ‖torch‖ over the fixture's strided sample.
    let ours = safetensors::load(&healed.join("model.safetensors"))
        .unwrap()
        .tensors;
    let reference = load_fixture("heal/params.safetensors");
    let mut checked = 0;
    for (name, want) in &reference {
        if name.contains(".__") || name.starts_with("embeddings.word_embeddings.weight") {
            continue;
        }
        let stride = reference[&format!("{name}.__stride__")].to_vec::<i64>()[0] as usize;
        let got: Vec<f32> = ours[name]
            .to_vec::<f32>()
            .into_iter()
            .step_by(stride)
            .collect();
        assert_relative_close(name, &got, &want.to_vec::<f32>());
        checked += 1;
    }
    let word = "embeddings.word_embeddings.weight";
    let rows = reference[&format!("{word}.rows")].to_vec::<f32>();
    let table = ours[word].to_vec::<f32>();
    let got: Vec<f32> = reference[&format!("{word}.ids")]
        .to_vec::<i64>()
        .iter()
        .flat_map(|&id| table[id as usize * 384..][..384].to_vec())
        .collect();
    assert_relative_close(word, &got, &rows);
    assert_eq!(checked + 1, 69, "the fixture lists 69 trained parameters");
}

fn assert_relative_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: sample sizes differ");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    assert!(
        diff / norm <= 1e-4,
        "{name}: ‖Δ‖/‖p‖ = {:e} > 1e-4",
        diff / norm
    );
}
