//! Bad input gets a clear error naming the problem: never a panic, never silent initialisation,
//! never a lost file. Uses a tiny random BERT written to a scratch folder.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use scalpel::models::bert::Bert;
use scalpel::models::sentence::SentenceEncoder;
use scalpel::tensor::{safetensors, Tensor};
use serde_json::json;

fn tiny_config(layers: usize) -> serde_json::Value {
    json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 50, "hidden_size": 8,
        "num_hidden_layers": layers, "num_attention_heads": 2, "intermediate_size": 16,
        "hidden_act": "gelu", "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12
    })
}

/// Writes a consistent tiny model and returns its folder; `edit` may change the tensors first.
fn tiny_model(name: &str, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) -> PathBuf {
    let dir = scratch(name);
    let config = tiny_config(2);
    let parsed =
        scalpel::models::bert::BertConfig::from_json(&config, Path::new("config.json")).unwrap();
    let mut tensors = BTreeMap::new();
    for (i, (name, shape)) in parsed.expected_tensors().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|j| ((i * 31 + j * 17) % 23) as f32 / 23.0 - 0.5)
            .collect();
        tensors.insert(name, Tensor::from_vec(&shape, values).unwrap());
    }
    edit(&mut tensors);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    safetensors::save(&dir.join("model.safetensors"), &tensors, &BTreeMap::new()).unwrap();
    dir
}

fn set_config(dir: &Path, key: &str, value: serde_json::Value) {
    let mut config = tiny_config(2);
    config[key] = value;
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn load_error(dir: &Path) -> String {
    match Bert::load(dir) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Runs the binary, expecting failure without a panic; returns stderr.
fn scalpel_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "scalpel {args:?} succeeded but should fail"
    );
    assert!(
        !stderr.contains("panicked"),
        "scalpel {args:?} panicked:\n{stderr}"
    );
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `scalpel heal` distilling MiniLM into itself on `data`, expecting failure; returns stderr.
fn heal_fails(data: &Path, out: &Path) -> String {
    let m = minilm_dir();
    scalpel_fails(&[
        "heal",
        "--student",
        s(&m),
        "--teacher",
        s(&m),
        "--data",
        s(data),
        "--output",
        s(out),
    ])
}

#[test]
fn consistent_tiny_model_loads() {
    let dir = tiny_model("tiny_ok", |_| {});
    assert_eq!(Bert::load(&dir).unwrap().num_layers(), 2);
}

#[test]
fn missing_tensor_is_named() {
    let dir = tiny_model("tiny_missing", |t| {
        t.remove("encoder.layer.1.output.dense.weight");
    });
    let err = load_error(&dir);
    assert!(
        err.contains("encoder.layer.1.output.dense.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn tensor_shape_disagreeing_with_config_is_named() {
    let dir = tiny_model("tiny_shape", |t| {
        t.insert(
            "encoder.layer.0.intermediate.dense.weight".into(),
            Tensor::zeros(&[15, 8], scalpel::tensor::DType::F32),
        );
    });
    let err = load_error(&dir);
    assert!(
        err.contains("encoder.layer.0.intermediate.dense.weight") && err.contains("[16, 8]"),
        "{err}"
    );
}

#[test]
fn layer_count_disagreeing_with_tensors_is_an_error() {
    let dir = tiny_model("tiny_layers", |_| {});
    set_config(&dir, "num_hidden_layers", json!(3));
    let err = load_error(&dir);
    assert!(
        err.contains("num_hidden_layers is 3") && err.contains("{0, 1}"),
        "{err}"
    );
    set_config(&dir, "num_hidden_layers", json!(1));
    assert!(load_error(&dir).contains("num_hidden_layers is 1"));
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tiny_model("tiny_arch", |_| {});
    set_config(&dir, "model_type", json!("gpt2"));
    let err = load_error(&dir);
    assert!(
        err.contains("unknown architecture") && err.contains("gpt2"),
        "{err}"
    );
}

#[test]
fn truncated_weights_file_names_the_file() {
    let dir = tiny_model("tiny_truncated", |_| {});
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn missing_or_unreadable_tokenizer_is_named() {
    let dir = tiny_model("tiny_tokenizer", |_| {});
    let err = SentenceEncoder::load(&dir)
        .err()
        .expect("no tokenizer.json")
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("not found"),
        "{err}"
    );
    std::fs::write(dir.join("tokenizer.json"), "{ this is not a tokenizer").unwrap();
    let err = SentenceEncoder::load(&dir)
        .err()
        .expect("garbage tokenizer.json")
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("unreadable"),
        "{err}"
    );
}

#[test]
fn wrong_model_path_is_named() {
    let err = scalpel_fails(&["inspect", "--model", "/nonexistent/model"]);
    assert!(err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn input_that_is_not_utf8_is_rejected_with_its_line() {
    let dir = scratch("not_utf8");
    let input = dir.join("in.txt");
    std::fs::write(&input, b"fine line\nbad \xff byte\n").unwrap();
    let err = scalpel_fails(&[
        "embed",
        "--model",
        s(&minilm_dir()),
        "--input",
        s(&input),
        "--output",
        s(&dir.join("out.jsonl")),
    ]);
    assert!(err.contains("in.txt:2: not valid UTF-8"), "{err}");
    assert!(!dir.join("out.jsonl").exists(), "no output on failure");
}

#[test]
fn cut_refuses_bad_requests() {
    let model = tiny_model("tiny_cut", |_| {});
    let out = scratch("tiny_cut_out").join("cut");
    let err = scalpel_fails(&[
        "cut",
        "--model",
        s(&model),
        "--output",
        s(&out),
        "--drop",
        "0,1",
    ]);
    assert!(err.contains("every encoder layer"), "{err}");
    let err = scalpel_fails(&[
        "cut",
        "--model",
        s(&model),
        "--output",
        s(&out),
        "--drop",
        "7",
    ]);
    assert!(err.contains("layer 7 is out of range"), "{err}");
    let err = scalpel_fails(&[
        "cut",
        "--model",
        s(&model),
        "--output",
        s(&out),
        "--drop",
        "1",
        "--keep",
        "0",
    ]);
    assert!(err.contains("--keep") || err.contains("--drop"), "{err}");
    let err = scalpel_fails(&[
        "cut",
        "--model",
        s(&model),
        "--output",
        s(&model),
        "--drop",
        "1",
    ]);
    assert!(err.contains("refusing to write"), "{err}");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep-me.txt"), "user data").unwrap();
    let err = scalpel_fails(&[
        "cut",
        "--model",
        s(&model),
        "--output",
        s(&out),
        "--drop",
        "1",
    ]);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep-me.txt")).unwrap(),
        "user data"
    );
}

#[test]
fn cut_renumbers_layers_and_rewrites_the_config() {
    let model = tiny_model("tiny_cut_ok", |_| {});
    let out = scratch("tiny_cut_ok_out").join("cut");
    let status = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args([
            "cut",
            "--model",
            s(&model),
            "--output",
            s(&out),
            "--drop",
            "0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let cut = Bert::load(&out).unwrap();
    let original = Bert::load(&model).unwrap();
    assert_eq!(cut.num_layers(), 1);
    // The kept layer (old 1) is now layer 0, values untouched.
    for suffix in ["attention.self.query.weight", "output.LayerNorm.bias"] {
        let new = cut
            .params
            .get(&format!("encoder.layer.0.{suffix}"))
            .unwrap()
            .value()
            .to_vec::<f32>();
        let old = original
            .params
            .get(&format!("encoder.layer.1.{suffix}"))
            .unwrap()
            .value()
            .to_vec::<f32>();
        assert_eq!(new, old, "{suffix}");
    }
    assert!(!cut
        .params
        .contains("encoder.layer.1.attention.self.query.weight"));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("surgery.json")).unwrap()).unwrap();
    assert_eq!(record["removed"], json!([0]));
    // The request as data, not a Rust debug string.
    assert_eq!(record["reason"], json!({"drop": [0]}));
}

#[test]
fn heal_rejects_empty_data() {
    let dir = scratch("heal_empty");
    let data = dir.join("empty.txt");
    std::fs::write(&data, "\n  \n").unwrap();
    let err = heal_fails(&data, &dir.join("out"));
    assert!(
        err.contains("empty.txt") && err.contains("no sentences"),
        "{err}"
    );
}

#[test]
fn heal_names_the_malformed_tsv_line() {
    let dir = scratch("heal_bad_tsv");
    let data = dir.join("pairs.tsv");
    std::fs::write(
        &data,
        "4.0\tA man plays.\tA man is playing.\n3.0\tonly one sentence\n",
    )
    .unwrap();
    let err = heal_fails(&data, &dir.join("out"));
    assert!(
        err.contains("pairs.tsv:2") && err.contains("found 2 fields"),
        "{err}"
    );
    assert!(!dir.join("out").exists());
}

#[test]
fn heal_refuses_a_teacher_that_cannot_be_compared() {
    let student = SentenceEncoder::load(&minilm_dir()).unwrap();
    // Hidden size: the tiny model (hidden 8) with the real tokenizer.
    let tiny = tiny_model("tiny_teacher", |_| {});
    std::fs::copy(
        minilm_dir().join("tokenizer.json"),
        tiny.join("tokenizer.json"),
    )
    .unwrap();
    let small = SentenceEncoder::load(&tiny).unwrap();
    let err = scalpel::surgery::heal::check_compatible(&student, &small)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hidden size 8") && err.contains("384"),
        "{err}"
    );
    // Tokenizer: the real model with one vocabulary entry renamed.
    let dir = scratch("other_tokenizer");
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(minilm_dir().join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let id = vocab.remove("hello").unwrap();
    vocab.insert("hallo".into(), id);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let mut other = SentenceEncoder::load(&minilm_dir()).unwrap();
    other.tokenizer = scalpel::models::tokenizer::TextTokenizer::load(&path, 256).unwrap();
    let err = scalpel::surgery::heal::check_compatible(&student, &other)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizers differ"), "{err}");
}

/// Commands with everything they require, so that only the flag value under test is at fault.
const HEAL: &str = "heal --student s --data d --output o";
const NEW_HEAD_BARE: &str = "new-head --model m --train t --eval e --output o";
const NEW_HEAD: &str = "new-head --model m --train t --eval e --output o --labels 3";
const SCORE: &str = "score --model m --data d";
const CUT: &str = "cut --model m --output o --data d";
const EMBED: &str = "embed --model m --input i --output o";
const INSPECT: &str = "inspect --model m";
const GEMM: &str = "bench gemm";
const FORWARD: &str = "bench forward --model m";

/// Every validated numeric flag after its command, with the values it must refuse.
#[rustfmt::skip]
const BAD_FLAG_VALUES: &[(&str, &str, &[&str])] = &[
    (HEAL, "--steps", &["0"]),
    (HEAL, "--epochs", &["0"]),
    (HEAL, "--minutes", &["NaN", "0"]),
    (HEAL, "--batch-size", &["0"]),
    (HEAL, "--lr", &["NaN", "-1", "inf", "0"]),
    (HEAL, "--weight-decay", &["-0.1", "NaN"]),
    (HEAL, "--dropout", &["1", "-0.5", "NaN"]),
    (HEAL, "--warmup", &["-1"]),
    (HEAL, "--clip", &["0", "inf"]),
    (HEAL, "--eval-every", &["0"]),
    (HEAL, "--checkpoint-every", &["0"]),
    (NEW_HEAD_BARE, "--labels", &["0"]),
    (NEW_HEAD, "--epochs", &["0"]),
    (NEW_HEAD, "--batch-size", &["0"]),
    (NEW_HEAD, "--lr", &["NaN", "-1"]),
    (NEW_HEAD, "--backbone-lr", &["-inf"]),
    (NEW_HEAD, "--weight-decay", &["inf"]),
    (SCORE, "--samples", &["0"]),
    (SCORE, "--span", &["0"]),
    (SCORE, "--batch-size", &["0"]),
    (SCORE, "--target-layers", &["0"]),
    (CUT, "--truncate", &["0"]),
    (CUT, "--auto", &["0"]),
    (CUT, "--metric", &["all"]),
    (EMBED, "--batch-size", &["0"]),
    (EMBED, "--threads", &["0"]),
    (INSPECT, "--seq", &["0"]),
    (GEMM, "--n", &["0"]),
    (GEMM, "--m", &["0"]),
    (GEMM, "--k", &["0"]),
    (GEMM, "--runs", &["0"]),
    (FORWARD, "--batch", &["0"]),
    (FORWARD, "--seq", &["0"]),
];

#[test]
fn every_numeric_flag_is_range_checked_when_parsed() {
    for &(command, flag, values) in BAD_FLAG_VALUES {
        for value in values {
            // `--flag=value`, so that a negative value is not taken for a flag of its own.
            let given = format!("{flag}={value}");
            let args: Vec<&str> = command.split(' ').chain([given.as_str()]).collect();
            let out = Command::new(env!("CARGO_BIN_EXE_scalpel"))
                .args(&args)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Exit code 2 is clap's usage error: refused while parsing, before any file is read.
            assert_eq!(
                out.status.code(),
                Some(2),
                "{args:?} was not refused:\n{stderr}"
            );
            assert!(
                stderr.contains(&format!("invalid value '{value}' for '{flag}")),
                "{args:?}: the error names neither the flag nor the value:\n{stderr}"
            );
        }
    }
}

#[test]
fn in_range_values_pass_the_flag_checks() {
    // The same flags at their edges of the valid range: refused only later, for the missing
    // model, not by the parser.
    let err = scalpel_fails(&[
        "heal",
        "--student",
        "/nonexistent/s",
        "--teacher",
        "/nonexistent/s",
        "--data",
        "/nonexistent/d",
        "--output",
        "/nonexistent/o",
        "--lr",
        "1e-30",
        "--weight-decay",
        "0",
        "--dropout",
        "0.999",
        "--clip",
        "1e-9",
        "--minutes",
        "0.001",
        "--steps",
        "1",
    ]);
    assert!(!err.contains("invalid value"), "{err}");
    assert!(err.contains("/nonexistent/d"), "{err}");
}

#[test]
fn heal_checks_the_ranges_of_options_that_did_not_come_from_the_command_line() {
    // A resumed run reads its options from trainer_state.json, not through the flag parsers.
    use scalpel::surgery::heal::{heal, Budget, HealOptions, HealRun, TrainingData};
    let mut student = SentenceEncoder::load(&minilm_dir()).unwrap();
    let data = TrainingData::Pairs(vec![("a".into(), "b".into()), ("c".into(), "d".into())]);
    let valid = HealOptions {
        budget: Budget {
            steps: Some(1),
            ..Budget::default()
        },
        batch_size: 2,
        lr: 1e-4,
        weight_decay: 0.01,
        dropout: 0.0,
        shuffle: false,
        seed: 0,
        freeze: Vec::new(),
        schedule: scalpel::autograd::optim::Schedule::Constant,
        warmup: 0,
        clip: None,
        precision: Default::default(),
        group_by_length: false,
    };
    type BreakIt = fn(&mut HealOptions);
    let cases: [(&str, BreakIt); 5] = [
        ("--lr NaN", |o| o.lr = f64::NAN),
        ("--weight-decay -1", |o| o.weight_decay = -1.0),
        ("--dropout 1", |o| o.dropout = 1.0),
        ("--clip inf", |o| o.clip = Some(f64::INFINITY)),
        ("--minutes -2", |o| o.budget.minutes = Some(-2.0)),
    ];
    for (expected, break_it) in cases {
        let mut opts = valid.clone();
        break_it(&mut opts);
        let err = heal(
            HealRun {
                student: &mut student,
                teacher: None,
                data: &data,
                opts: &opts,
                checkpoint: None,
                eval: &[],
                eval_every: None,
                resume: None,
                stop: None,
                invocation: json!({}),
            },
            |_| Ok(()),
        )
        .expect_err(expected)
        .to_string();
        assert!(
            err.contains(expected) && err.contains("out of range"),
            "{err}"
        );
    }
}

const LAYER_NORM: &str = "encoder.layer.1.attention.output.LayerNorm.weight";

#[test]
fn non_finite_weights_are_named_with_their_count_at_load() {
    let dir = tiny_model("tiny_nan_layernorm", |t| {
        let mut values = t[LAYER_NORM].to_vec::<f32>();
        values[0] = f32::NAN;
        values[3] = f32::INFINITY;
        values[5] = f32::NEG_INFINITY;
        t.insert(LAYER_NORM.into(), Tensor::from_vec(&[8], values).unwrap());
    });
    let err = load_error(&dir);
    assert!(
        err.contains(LAYER_NORM) && err.contains("3 non-finite values") && err.contains("of 8"),
        "{err}"
    );
    // Through the CLI: an error, and no output file of `null`s.
    let out = dir.join("out.jsonl");
    let input = dir.join("in.txt");
    std::fs::write(&input, "a sentence\n").unwrap();
    let err = scalpel_fails(&[
        "embed",
        "--model",
        s(&dir),
        "--input",
        s(&input),
        "--output",
        s(&out),
    ]);
    assert!(
        err.contains(LAYER_NORM) && err.contains("3 non-finite"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn a_model_with_non_finite_weights_is_never_written() {
    let dir = tiny_model("tiny_write_nan", |_| {});
    let mut bert = Bert::load(&dir).unwrap();
    let weight = bert
        .params
        .get_mut(LAYER_NORM)
        .unwrap()
        .value_mut()
        .unwrap();
    weight.values_mut::<f32>().unwrap()[2] = f32::NAN;
    let out = scratch("tiny_write_nan_out").join("model");
    let err = scalpel::surgery::checkpoint::write_model(&bert, &dir, &out, false, &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(LAYER_NORM) && err.contains("1 non-finite"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is left at the output");

    // A new head that diverged is refused too (the encoder itself is fine here).
    let encoder = SentenceEncoder::load(&minilm_dir()).unwrap();
    let mut weight = vec![0.5f32; 4 * 384];
    weight[7] = f32::INFINITY;
    let mut head = scalpel::autograd::Params::default();
    let weight = Tensor::from_vec(&[1, 4 * 384], weight).unwrap();
    head.insert(
        "classifier.weight",
        scalpel::autograd::Var::parameter(weight),
    );
    let report = scalpel::surgery::head::HeadReport {
        labels: vec!["A".into()],
        input_features: "u, v, |u - v|, u * v".into(),
        in_features: 4 * 384,
        frozen_backbone: true,
        train_pairs: 1,
        eval_pairs: 1,
        epochs: 1,
        steps: 1,
        accuracy_before: 0.0,
        accuracy_after: 0.0,
        majority_rate: 1.0,
        final_loss: f64::INFINITY,
        seconds: 0.0,
    };
    let out = scratch("diverged_head_out").join("model");
    let write = scalpel::surgery::head::write_head_model;
    let err = write(&encoder, &head, &report, &minilm_dir(), &out, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("classifier.weight") && err.contains("1 non-finite"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn an_embedding_that_turns_non_finite_is_an_error() {
    // Finite weights whose forward overflows f32: the first FFN's products of 384 LayerNorm
    // outputs with weights of 3e38 sum past f32::MAX.
    let mut encoder = SentenceEncoder::load(&minilm_dir()).unwrap();
    let weight = encoder
        .bert
        .params
        .get_mut("encoder.layer.0.intermediate.dense.weight")
        .unwrap()
        .value_mut()
        .unwrap();
    weight.values_mut::<f32>().unwrap().fill(3e38);
    let err = encoder
        .embed(&["fine", "a sentence that overflows"], 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not finite") && err.contains("of 2"), "{err}");
}

#[test]
fn eval_refuses_what_spearman_cannot_rank() {
    let dir = scratch("eval_unrankable");
    let m = minilm_dir();
    let constant = dir.join("constant.tsv");
    std::fs::write(
        &constant,
        "3.0\tA man plays.\tA man is playing.\n3.0\tA cat.\tA dog.\n",
    )
    .unwrap();
    let err = scalpel_fails(&["eval", "--model", s(&m), "--sts", s(&constant), "--json"]);
    assert!(
        err.contains("constant.tsv") && err.contains("different gold scores"),
        "{err}"
    );
    let nan = dir.join("nan.tsv");
    std::fs::write(
        &nan,
        "3.0\tA man plays.\tA man is playing.\nNaN\tA cat.\tA dog.\n",
    )
    .unwrap();
    let err = scalpel_fails(&["eval", "--model", s(&m), "--sts", s(&nan)]);
    assert!(
        err.contains("nan.tsv:2") && err.contains("not a finite number"),
        "{err}"
    );
}

/// A sparse file of `len` bytes starting with `head`: cheap to make at any size.
fn sparse_file(path: &Path, head: &[u8], len: u64) {
    std::fs::write(path, head).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn a_huge_tokenizer_or_config_is_refused_by_its_size_before_reading() {
    let dir = tiny_model("tiny_huge_tokenizer", |_| {});
    sparse_file(&dir.join("tokenizer.json"), b"{", 1 << 30);
    let err = SentenceEncoder::load(&dir)
        .err()
        .expect("1 GB tokenizer")
        .to_string();
    assert!(
        err.contains("tokenizer.json")
            && err.contains("1073741824 bytes is over the 67108864-byte limit"),
        "{err}"
    );
    sparse_file(&dir.join("config.json"), b"{", 1 << 30);
    let err = load_error(&dir);
    assert!(
        err.contains("config.json") && err.contains("over the 67108864-byte limit"),
        "{err}"
    );
}

#[test]
fn a_100_mb_line_is_refused_naming_its_file_and_line() {
    let dir = scratch("huge_line");
    let data = dir.join("sentences.txt");
    sparse_file(&data, b"a first sentence\n", 100 << 20);
    let err = scalpel::surgery::data::read_lines(&data)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sentences.txt:2: line longer than 1048576 bytes"),
        "{err}"
    );
    // Every reader of text goes through it: heal's data files, eval's pair files.
    let err = heal_fails(&data, &dir.join("out"));
    assert!(err.contains("sentences.txt:2: line longer than"), "{err}");
    let pairs = dir.join("pairs.tsv");
    sparse_file(&pairs, b"4.0\tA man plays.\tA man is playing.\n", 100 << 20);
    let err = scalpel_fails(&["eval", "--model", s(&minilm_dir()), "--sts", s(&pairs)]);
    assert!(err.contains("pairs.tsv:2: line longer than"), "{err}");
}

#[test]
fn a_hostile_layer_count_is_an_error_not_an_allocation() {
    // Found by fuzzing: the layer check had materialised 0..num_hidden_layers (a 64 GB
    // allocation, and an abort, for 2^33).
    let dir = tiny_model("tiny_huge_layer_count", |_| {});
    set_config(&dir, "num_hidden_layers", json!(1u64 << 40));
    let err = load_error(&dir);
    assert!(err.contains("num_hidden_layers is 1099511627776"), "{err}");
}

/// MiniLM's tokenizer.json after `edit`, written to a scratch folder; the loader's error.
fn tokenizer_error(name: &str, edit: impl FnOnce(&mut String)) -> String {
    let mut text = std::fs::read_to_string(minilm_dir().join("tokenizer.json")).unwrap();
    edit(&mut text);
    let path = scratch(name).join("tokenizer.json");
    std::fs::write(&path, text).unwrap();
    let tokenizer = scalpel::models::tokenizer::TextTokenizer::load(&path, 256);
    match tokenizer.and_then(|t| t.encode("a man is playing")) {
        Ok(_) => panic!("{name}: accepted"),
        Err(e) => e.to_string(),
    }
}

fn edit_json(text: &mut String, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value = serde_json::from_str(text).unwrap();
    edit(&mut json);
    *text = json.to_string();
}

#[test]
fn tokenizer_files_that_hang_or_panic_the_tokenizers_crate_are_errors() {
    // Each found by the fuzzer (scripts/fuzz.sh) or reported upstream; before the checks the
    // first panicked in tokenizers 0.21.4's decoder deserializer, the second took 18 s to load,
    // the last two panicked at encode time.
    let err = tokenizer_error("tokenizer_decoder_syntax", |t| {
        *t = t.replacen(r#""decoder":{"#, r#""decoder":{"cleanup": t"#, 1);
    });
    assert!(err.contains("unreadable: not valid JSON"), "{err}");
    let err = tokenizer_error("tokenizer_long_added_token", |t| {
        edit_json(t, |j| {
            j["added_tokens"][0]["content"] = json!("x".repeat(16384))
        });
    });
    assert!(err.contains("an added token of 16384 characters"), "{err}");
    let template = json!({"type": "TemplateProcessing", "pair": [], "special_tokens": {},
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}]});
    let err = tokenizer_error("tokenizer_template", |t| {
        edit_json(t, |j| j["post_processor"] = template.clone());
    });
    assert!(err.contains("special token `[CLS]`"), "{err}");
    // Nested in a Sequence the check does not see it: the panic itself becomes the error.
    let err = tokenizer_error("tokenizer_nested_template", |t| {
        edit_json(t, |j| {
            j["post_processor"] = json!({"type": "Sequence", "processors": [template]});
        });
    });
    assert!(
        err.contains("cannot encode") && err.contains("tokenizers crate panicked"),
        "{err}"
    );
}
