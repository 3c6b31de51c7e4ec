//! `scalpel cut` on a Llama-family GGUF: the folder it writes holds exactly the kept decoder
//! layers of the source, renumbered, bit for bit, with everything else unchanged and the config
//! rewritten; bad selections are errors naming the problem. (transformers loading the folder and
//! giving the logits of the source with the same layers deleted is checked by
//! `scripts/reference/check_llama_cut.py`.)

use crate::common::{self, scratch};

use std::process::Command;

use scalpel::models::llama::LlamaCheckpoint;
use scalpel::tensor::safetensors;
use serde_json::Value;

fn scalpel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn cutting_a_gguf_keeps_the_chosen_layers_renumbered() {
    let source = common::smollm2_gguf();
    let out = scratch("decoder-cut").join("kept-3-17");
    let run = scalpel(&[
        "cut",
        "--model",
        source.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--keep",
        "3,17",
        "--force",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let original = LlamaCheckpoint::from_gguf(&source).unwrap();
    let config = read_json(&out.join("config.json"));
    let mut want = original.config.to_hf_json();
    want["num_hidden_layers"] = 2.into();
    assert_eq!(config, want, "config.json: the source's with 2 layers");
    let cut = safetensors::load(&out.join("model.safetensors"))
        .unwrap()
        .tensors;
    let renamed = |name: &str| {
        name.replace("model.layers.0.", "model.layers.3.")
            .replace("model.layers.1.", "model.layers.17.")
    };
    let mut expected: Vec<String> = original
        .weights
        .keys()
        .filter(|n| {
            !n.starts_with("model.layers.")
                || n.starts_with("model.layers.3.")
                || n.starts_with("model.layers.17.")
        })
        .cloned()
        .collect();
    let mut got: Vec<String> = cut.keys().map(|n| renamed(n)).collect();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "tensor names, mapped back to the source's");
    for (name, tensor) in &cut {
        let from = &original.weights[&renamed(name)];
        assert_eq!(tensor.shape(), from.shape(), "{name}");
        assert!(
            tensor.to_vec::<f32>() == from.to_vec::<f32>(),
            "{name} differs from the source's {}",
            renamed(name)
        );
    }
    let record = read_json(&out.join("surgery.json"));
    assert_eq!(record["kept"], serde_json::json!([3, 17]));
    assert_eq!(record["source_layers"], 30);
    assert_eq!(record["reason"], serde_json::json!({"keep": [3, 17]}));
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} written");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_decoder_cuts_and_scores_are_errors_naming_the_problem() {
    let source = common::smollm2_gguf();
    let dir = scratch("decoder-cut-bad");
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let out = dir.join("never-written");
    let (model, output, data) = (
        source.to_str().unwrap(),
        out.to_str().unwrap(),
        text.to_str().unwrap(),
    );
    let cases: [(&[&str], &str); 3] = [
        (
            &["cut", "--model", model, "--output", output, "--drop", "30"],
            "layer 30 is out of range",
        ),
        (
            &[
                "cut",
                "--model",
                model,
                "--output",
                output,
                "--auto",
                "24",
                "--data",
                data,
                "--metric",
                "grad-norm",
            ],
            "grad-norm scores sentence encoders",
        ),
        (
            &[
                "score",
                "--model",
                model,
                "--data",
                data,
                "--metric",
                "greedy-ppl",
            ],
            "give --target-layers",
        ),
    ];
    for (args, needle) in cases {
        let run = scalpel(args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

/// Block influence, angular distance (every token and last token) and drop-one perplexity of
/// the real SmolLM2 on two 16-token windows, against transformers on the same GGUF
/// (`scripts/reference/make_decoder_score_fixture.py`).
#[test]
fn decoder_layer_scores_match_transformers() {
    use scalpel::surgery::decoder::{calibration_perplexity, score_decoder, DecoderCalibration};
    use scalpel::surgery::score::Metric;
    let fixture = read_json(&common::fixture("llama/decoder_scores.json"));
    let windows: Vec<Vec<u32>> = serde_json::from_value(fixture["windows"].clone()).unwrap();
    let data = DecoderCalibration { windows };
    let mut checkpoint = LlamaCheckpoint::from_gguf(&common::smollm2_gguf()).unwrap();
    let model = checkpoint.model(&common::smollm2_gguf()).unwrap();
    let full = calibration_perplexity(&model, &data).unwrap();
    let want_full = fixture["perplexity"].as_f64().unwrap();
    assert!(
        (full / want_full - 1.0).abs() < 1e-4,
        "perplexity {full} against transformers' {want_full}"
    );
    let metrics = [
        Metric::BlockInfluence,
        Metric::Angular,
        Metric::AngularLast,
        Metric::DropPpl,
    ];
    let report = score_decoder(&model, &data, &metrics, 1, Some(24)).unwrap();
    for (metric, key) in metrics[..3]
        .iter()
        .zip(["block_influence", "angular", "angular_last"])
    {
        let want: Vec<f64> = serde_json::from_value(fixture["scores"][key].clone()).unwrap();
        let got = &report.get(*metric).unwrap().per_layer;
        for (l, (g, w)) in got.iter().zip(&want).enumerate() {
            let g = g.unwrap();
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1e-2),
                "{key} of layer {l}: {g} against transformers' {w}"
            );
        }
    }
    let dropped: Vec<f64> =
        serde_json::from_value(fixture["perplexity_without_layer"].clone()).unwrap();
    let got = &report.get(Metric::DropPpl).unwrap().per_layer;
    for (l, (g, w)) in got.iter().zip(&dropped).enumerate() {
        let without = g.unwrap() + full;
        assert!(
            (without / w - 1.0).abs() < 1e-3,
            "perplexity without layer {l}: {without} against transformers' {w}"
        );
    }
    // The 24 layers drop-ppl keeps are those whose removal costs most.
    let keep = report.get(Metric::DropPpl).unwrap().keep.clone().unwrap();
    let mut by_cost: Vec<usize> = (0..30).collect();
    by_cost.sort_by(|&a, &b| dropped[b].total_cmp(&dropped[a]));
    let mut want_keep = by_cost[..24].to_vec();
    want_keep.sort_unstable();
    assert_eq!(keep, want_keep);
}

#[test]
fn decoder_scoring_on_a_device_is_refused_before_any_work_and_says_cpu_otherwise() {
    let model = common::smollm2_gguf();
    let model = model.to_str().unwrap();
    let text = scratch("decoder-device").join("text.txt");
    std::fs::write(&text, "One line of text to score.").unwrap();
    let text = text.to_str().unwrap();
    let score = ["score", "--model", model, "--data", text];
    let run = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--device", "emu"])
        .args(score)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "score ran on the emulator");
    assert!(
        stderr
            .contains("--device emu: Llama decoders run on the CPU only so far for score and cut"),
        "{stderr}"
    );
    // `auto` scores on the CPU and says so (whatever GPU the machine has), before reading the
    // data: a missing file fails after the line.
    let run = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args([
            "--device",
            "auto",
            "score",
            "--model",
            model,
            "--data",
            "/nonexistent.txt",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr
            .contains("device: cpu (Llama decoders run on the CPU only so far for score and cut)"),
        "{stderr}"
    );
}
