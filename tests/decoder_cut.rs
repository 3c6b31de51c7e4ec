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
fn bad_decoder_cuts_are_errors_naming_the_problem() {
    let source = common::smollm2_gguf();
    let out = scratch("decoder-cut-bad").join("never-written");
    let cases: [(&[&str], &str); 2] = [
        (&["--drop", "30"], "layer 30 is out of range"),
        (&["--auto", "24", "--data", "d.txt"], "--auto scores layers"),
    ];
    for (selection, needle) in cases {
        let mut args = vec![
            "cut",
            "--model",
            source.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(selection);
        let run = scalpel(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{selection:?} succeeded");
        assert!(stderr.contains(needle), "{selection:?}: {stderr}");
        assert!(!out.exists(), "{selection:?} wrote {}", out.display());
    }
}
