//! `scalpel cut --replace` (LLM-Streamline): a removed block of decoder layers replaced by one
//! layer trained to reproduce the block's output. The written folder loads; its new layer, run on
//! the block's input hidden states (recomputed here from the source), is closer to the block's
//! output than the copy of the block's first layer it started from, by the amounts
//! `surgery.json` records; every other tensor is the source's, bit for bit.

use crate::common::{self, scratch};

use std::path::Path;
use std::process::Command;

use scalpel::autograd::{ops, Var};
use scalpel::models::llama::{Llama, LlamaCheckpoint};
use scalpel::surgery::decoder::DecoderCalibration;

fn scalpel() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scalpel"));
    cmd.args(["--device", "cpu", "--threads", "2"]);
    cmd
}

fn output_of(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

fn load(path: &Path) -> (LlamaCheckpoint, Llama) {
    let mut checkpoint = LlamaCheckpoint::load(path).unwrap();
    let model = checkpoint.model(path).unwrap();
    (checkpoint, model)
}

/// Mean squared error of `model`'s layer `l` run on `input` against `target`.
fn layer_mse(model: &Llama, l: usize, input: &Var, target: &Var) -> f64 {
    let out = model.layer_forward(l, input).unwrap();
    ops::mse_loss(&out, target).unwrap().value().to_vec::<f64>()[0]
}

#[test]
fn a_replaced_block_is_one_trained_layer_closer_to_the_block_than_its_initial_copy() {
    let dir = scratch("decoder-replace");
    // A 5-layer source keeps the test fast; its block 1-3 is replaced.
    let source = dir.join("source");
    let (ok, err) = output_of(
        scalpel()
            .args(["cut", "--keep", "0,1,2,3,29", "--model"])
            .arg(common::smollm2_gguf())
            .arg("--output")
            .arg(&source),
    );
    assert!(ok, "{err}");
    let text = dir.join("text.txt");
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("llama/tokens.json")).unwrap(),
    )
    .unwrap();
    let passages: Vec<&str> = fixture
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|case| case["text"].as_str())
        .filter(|t| t.len() > 200)
        .take(4)
        .collect();
    std::fs::write(&text, passages.join("\n")).unwrap();
    let out = dir.join("replaced");
    let cut = |out: &Path, drop: &str| {
        let mut cmd = scalpel();
        cmd.args(["cut", "--drop", drop, "--replace", "--model"])
            .arg(&source)
            .arg("--output")
            .arg(out)
            .arg("--data")
            .arg(&text)
            .args(["--windows", "4", "--window-tokens", "16"])
            .args(["--replace-steps", "30", "--replace-lr", "1e-3"])
            .args(["--replace-batch-size", "2"]);
        cmd
    };
    let (ok, err) = output_of(&mut cut(&out, "1-3"));
    assert!(ok, "{err}");

    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("surgery.json")).unwrap()).unwrap();
    let replacement = &record["replaced"]["replacement"];
    assert_eq!(record["removed"], serde_json::json!([1, 2, 3]));
    assert_eq!(
        (replacement["first"].as_u64(), replacement["last"].as_u64()),
        (Some(1), Some(3))
    );
    let (copy, trained) = (
        replacement["mse_copy"].as_f64().unwrap(),
        replacement["mse_trained"].as_f64().unwrap(),
    );
    assert!(trained < 0.9 * copy, "trained {trained} vs copy {copy}");

    let (src_files, src) = load(&source);
    let (_, replaced) = load(&out);
    assert_eq!(replaced.config.num_hidden_layers, 3);
    // The calibration windows `cut` trained on, rebuilt from the same text and flags.
    let ids = src_files
        .tokenizer
        .encode(std::fs::read_to_string(&text).unwrap(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    let data = DecoderCalibration::from_ids(&ids, 16, 4).unwrap();
    let (mut mse_copy, mut mse_trained) = (0.0, 0.0);
    for window in &data.windows {
        let states = src.layer_states(window, 1).unwrap();
        let (input, target) = (&states[1], &states[4]);
        mse_copy += layer_mse(&src, 1, input, target) / data.windows.len() as f64;
        mse_trained += layer_mse(&replaced, 1, input, target) / data.windows.len() as f64;
    }
    assert!(
        (mse_copy - copy).abs() < 1e-4 * copy,
        "{mse_copy} vs {copy}"
    );
    assert!(
        (mse_trained - trained).abs() < 1e-4 * trained,
        "{mse_trained} vs {trained}"
    );
    // Everything but the new layer is the source's: layer 0, layer 4 as layer 2, the rest.
    for (name, var) in replaced.params.iter() {
        let from = name.replace("model.layers.2.", "model.layers.4.");
        let same =
            src.params.get(&from).unwrap().value().to_vec::<f32>() == var.value().to_vec::<f32>();
        assert_eq!(same, !name.starts_with("model.layers.1."), "{name}");
    }

    let refused = [("1,3", "contiguous"), ("2", "at least 2")];
    for (drop, needle) in refused {
        let bad = dir.join(format!("bad-{drop}"));
        let (ok, err) = output_of(&mut cut(&bad, drop));
        assert!(!ok && err.contains(needle), "--drop {drop}: {err}");
        assert!(!bad.exists());
    }
    let (ok, err) = output_of(
        scalpel()
            .args(["cut", "--drop", "1-3", "--replace", "--model"])
            .arg(&source)
            .arg("--output")
            .arg(dir.join("no-data")),
    );
    assert!(!ok && err.contains("--data"), "{err}");
}
