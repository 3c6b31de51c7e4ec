//! Llama from GGUF: config, weights (dequantized, Q/K un-permuted) and tokenizer of the real
//! SmolLM2 file against transformers' own GGUF loader (fixtures from
//! scripts/reference/make_llama_fixtures.py), `scalpel convert`, and bad input on tiny synthetic
//! files.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::gguf_writer::GgufWriter;
use common::{fixture, scratch};
use scalpel::models::llama::weights::unpermute_rows;
use scalpel::models::llama::{LlamaCheckpoint, LlamaConfig};
use scalpel::tensor::gguf::Gguf;
use scalpel::tensor::safetensors;
use serde_json::Value;

/// The real file decoded once for all the tests that read it (about 0.6 GB of f32).
fn smollm2() -> &'static LlamaCheckpoint {
    static CHECKPOINT: OnceLock<LlamaCheckpoint> = OnceLock::new();
    CHECKPOINT.get_or_init(|| LlamaCheckpoint::from_gguf(&common::smollm2_gguf()).unwrap())
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn config_matches_transformers() {
    let want = read_json(&fixture("llama/config.json"));
    let c = &smollm2().config;
    let count = |key: &str| want[key].as_u64().unwrap() as usize;
    assert_eq!(c.num_hidden_layers, count("num_hidden_layers"));
    assert_eq!(c.hidden_size, count("hidden_size"));
    assert_eq!(c.num_attention_heads, count("num_attention_heads"));
    assert_eq!(c.num_key_value_heads, count("num_key_value_heads"));
    assert_eq!(c.head_dim, count("head_dim"));
    assert_eq!(c.intermediate_size, count("intermediate_size"));
    assert_eq!(c.vocab_size, count("vocab_size"));
    assert_eq!(c.max_position_embeddings, count("max_position_embeddings"));
    assert_eq!(
        c.rope_theta,
        want["rope_parameters"]["rope_theta"].as_f64().unwrap()
    );
    // transformers keeps the f32 of the file (9.999999747e-6); the config says the 1e-5 it means.
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(
        c.rms_norm_eps as f32,
        want["rms_norm_eps"].as_f64().unwrap() as f32
    );
    assert!(c.tie_word_embeddings && want["tie_word_embeddings"].as_bool().unwrap());
    let id = |key: &str| want[key].as_u64().map(|v| v as u32);
    assert_eq!(c.bos_token_id, id("bos_token_id"));
    assert_eq!(c.eos_token_id, id("eos_token_id"));
    assert_eq!(c.pad_token_id, id("pad_token_id"));
    // The numbers, in case both sides agree on something else.
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert_eq!(
        (c.intermediate_size, c.vocab_size, c.rope_theta),
        (1536, 49152, 1e5)
    );
}

fn close(got: f64, want: f64, tolerance: f64) -> bool {
    (got - want).abs() <= tolerance * want.abs().max(1.0)
}

/// Dequantized values as transformers holds them: the Q8_0 embedding, Q4_1 projections with the
/// query/key rows un-permuted, F32 norms. Row prefixes must match to 1e-6 (they are equal f32s),
/// float64 row sums and norms to 1e-6 relative.
#[test]
fn weights_match_transformers() {
    let fixtures = read_json(&fixture("llama/tensors.json"));
    let weights = &smollm2().weights;
    let mut want_keys: Vec<&str> = fixtures["__keys__"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    // transformers lists the tied head among its parameters; the file (and we) store it once.
    want_keys.retain(|k| *k != "lm_head.weight");
    assert_eq!(
        weights.keys().map(String::as_str).collect::<Vec<_>>(),
        want_keys
    );
    let mut checked = 0;
    for (name, want) in fixtures.as_object().unwrap() {
        if name == "__keys__" {
            continue;
        }
        let tensor = &weights[name];
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(tensor.shape(), shape, "{name}");
        let values = tensor.to_vec::<f32>();
        let norm = values
            .iter()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            close(norm, want["norm"].as_f64().unwrap(), 1e-6),
            "{name}: norm {norm} vs {}",
            want["norm"]
        );
        let floats = |v: &Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        };
        if shape.len() == 1 {
            let diff = common::max_abs_diff(&values, &floats(&want["values"]));
            assert!(diff <= 1e-6, "{name}: values differ by {diff}");
            checked += 1;
            continue;
        }
        let columns = shape[1];
        let step = want["row_sum_step"].as_u64().unwrap() as usize;
        for (i, sum) in want["row_sums"].as_array().unwrap().iter().enumerate() {
            let row = i * step;
            let got: f64 = values[row * columns..(row + 1) * columns]
                .iter()
                .map(|&v| v as f64)
                .sum();
            let want_sum = sum.as_f64().unwrap();
            assert!(
                close(got, want_sum, 1e-6),
                "{name}: row {row} sums to {got}, transformers {want_sum}"
            );
        }
        for (row, prefix) in want["rows"].as_object().unwrap() {
            let row: usize = row.parse().unwrap();
            let prefix = floats(prefix);
            let got = &values[row * columns..row * columns + prefix.len()];
            let diff = common::max_abs_diff(got, &prefix);
            assert!(diff <= 1e-6, "{name}: row {row} differs by {diff}");
        }
        checked += 1;
    }
    assert_eq!(checked, 8);
}

struct TokenCase {
    text: String,
    /// transformers' ids for the GGUF.
    transformers: Vec<u32>,
    /// SmolLM2's pre-tokenizer where it differs from transformers'.
    smollm: Option<Vec<u32>>,
}

fn token_cases() -> Vec<TokenCase> {
    let ids = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    read_json(&fixture("llama/tokens.json"))
        .as_array()
        .unwrap()
        .iter()
        .map(|case| TokenCase {
            text: case["text"].as_str().unwrap().to_string(),
            transformers: ids(&case["ids"]),
            smollm: case.get("smollm_ids").map(ids),
        })
        .collect()
}

/// Every test string (Unicode, digits, code, whitespace runs, special tokens, wikitext lines)
/// against transformers' tokenizer for the file, where SmolLM2's pre-tokenizer (`smollm`: digits
/// split off first) agrees with it, and against that pre-tokenizer over the same vocabulary where
/// it does not.
fn assert_tokenizes_like_the_fixture(tokenizer: &tokenizers::Tokenizer, source: &str) {
    let cases = token_cases();
    assert!(cases.len() >= 250, "{} strings", cases.len());
    let mut differing = 0;
    for case in &cases {
        let got = tokenizer
            .encode(case.text.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        let want = case.smollm.as_ref().unwrap_or(&case.transformers);
        assert_eq!(&got, want, "{source}: {:?}", case.text);
        differing += usize::from(got != case.transformers);
    }
    // Where transformers splits differently, a digit follows a whitespace run or is not ASCII.
    assert_eq!(differing, 7, "{source}");
}

#[test]
fn tokenizer_matches_transformers() {
    assert_tokenizes_like_the_fixture(&smollm2().tokenizer, "tokenizer from the GGUF");
    let config = &smollm2().tokenizer_config;
    assert_eq!(config["bos_token"], "<|im_start|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["pad_token"], "<|im_end|>");
    assert_eq!(config["unk_token"], "<|endoftext|>");
    assert!(config["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
}

pub(crate) fn scalpel(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .unwrap()
}

fn convert(model: &Path, output: &Path, force: bool) -> std::process::Output {
    let (model, output) = (model.to_str().unwrap(), output.to_str().unwrap());
    let mut args = vec!["convert", "--model", model, "--output", output];
    if force {
        args.push("--force");
    }
    scalpel(&args)
}

/// The real file converted: the folder's weights are the loader's, its config the issue's, its
/// tokenizer.json tokenizes like the fixture. (transformers loading this folder with no missing or
/// unexpected keys and equal logits is checked by `make_llama_fixtures.py --check-converted`.)
#[test]
fn convert_writes_a_hugging_face_folder() {
    let out = scratch("llama-convert-real").join("smollm2");
    let run = convert(&common::smollm2_gguf(), &out, false);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(config["num_key_value_heads"], 3);
    let generation = read_json(&out.join("generation_config.json"));
    assert_eq!(
        (
            generation["bos_token_id"].as_u64(),
            generation["eos_token_id"].as_u64()
        ),
        (Some(1), Some(2))
    );
    let tokenizer_config = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(
        tokenizer_config["chat_template"],
        smollm2().tokenizer_config["chat_template"]
    );
    let saved = safetensors::load(&out.join("model.safetensors"))
        .unwrap()
        .tensors;
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        smollm2().weights.keys().collect::<Vec<_>>()
    );
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    ] {
        assert_eq!(
            saved[name].to_vec::<f32>(),
            smollm2().weights[name].to_vec::<f32>(),
            "{name}"
        );
    }
    drop(saved);
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_tokenizes_like_the_fixture(&tokenizer, "the written tokenizer.json");
    // 0.5 GB of f32 weights: not worth keeping between runs.
    std::fs::remove_dir_all(&out).unwrap();
}

// ---- tiny synthetic models -------------------------------------------------------------------

const TINY_LAYERS: u32 = 2;
const HIDDEN: u64 = 8;
const HEADS: u32 = 2;
const KV_HEADS: u32 = 1;
const FFN: u64 = 16;

fn tiny_tokens() -> Vec<String> {
    ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "Ġc"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A consistent tiny Llama (F32 weights; row r of every matrix holds the value r, so row order is
/// visible) that `edit` may spoil.
pub(crate) fn tiny_llama(edit: impl FnOnce(&mut GgufWriter)) -> GgufWriter {
    let tokens = tiny_tokens();
    let vocab = tokens.len() as u64;
    let head_dim = HIDDEN / u64::from(HEADS);
    let mut file = GgufWriter::default();
    file.string("general.architecture", "llama")
        .u32("llama.block_count", TINY_LAYERS)
        .u32("llama.context_length", 32)
        .u32("llama.embedding_length", HIDDEN as u32)
        .u32("llama.feed_forward_length", FFN as u32)
        .u32("llama.attention.head_count", HEADS)
        .u32("llama.attention.head_count_kv", KV_HEADS)
        .f32("llama.rope.freq_base", 1e4)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-6)
        .u32("llama.rope.dimension_count", head_dim as u32)
        .string("tokenizer.ggml.model", "gpt2")
        .string("tokenizer.ggml.pre", "smollm")
        .strings("tokenizer.ggml.tokens", &tokens)
        .i32s("tokenizer.ggml.token_type", &[3, 1, 1, 1, 1, 1, 1])
        .strings("tokenizer.ggml.merges", &["a b".into(), "Ġ c".into()])
        .u32("tokenizer.ggml.bos_token_id", 0)
        .u32("tokenizer.ggml.eos_token_id", 0);
    // Dims innermost first: a [rows, columns] matrix is stored as [columns, rows].
    let matrix = |file: &mut GgufWriter, name: &str, rows: u64, columns: u64| {
        let values: Vec<f32> = (0..rows)
            .flat_map(|r| (0..columns).map(move |_| r as f32))
            .collect();
        file.f32_tensor(name, &[columns, rows], &values);
    };
    matrix(&mut file, "token_embd.weight", vocab, HIDDEN);
    file.f32_tensor("output_norm.weight", &[HIDDEN], &[1.0; HIDDEN as usize]);
    let kv = u64::from(KV_HEADS) * head_dim;
    for layer in 0..TINY_LAYERS {
        let name = |suffix: &str| format!("blk.{layer}.{suffix}");
        file.f32_tensor(
            &name("attn_norm.weight"),
            &[HIDDEN],
            &[1.0; HIDDEN as usize],
        );
        matrix(&mut file, &name("attn_q.weight"), HIDDEN, HIDDEN);
        matrix(&mut file, &name("attn_k.weight"), kv, HIDDEN);
        matrix(&mut file, &name("attn_v.weight"), kv, HIDDEN);
        matrix(&mut file, &name("attn_output.weight"), HIDDEN, HIDDEN);
        file.f32_tensor(&name("ffn_norm.weight"), &[HIDDEN], &[1.0; HIDDEN as usize]);
        matrix(&mut file, &name("ffn_gate.weight"), FFN, HIDDEN);
        matrix(&mut file, &name("ffn_up.weight"), FFN, HIDDEN);
        matrix(&mut file, &name("ffn_down.weight"), HIDDEN, FFN);
    }
    edit(&mut file);
    file
}

pub(crate) fn write_tiny(test: &str, file: &GgufWriter) -> PathBuf {
    let path = scratch(&format!("llama-{test}")).join("tiny.gguf");
    std::fs::write(&path, file.bytes()).unwrap();
    path
}

fn first_column(tensor: &scalpel::tensor::Tensor) -> Vec<f32> {
    let columns = tensor.shape()[1];
    tensor
        .to_vec::<f32>()
        .chunks(columns)
        .map(|row| row[0])
        .collect()
}

/// The un-permutation worked out by hand from transformers' `reverse_permute_weights` (reshape to
/// (heads, head_rows / 2, 2), swap the last two axes): within a head of 4 rows, file rows
/// 0, 1, 2, 3 become rows 0, 2, 1, 3.
#[test]
fn query_and_key_rows_are_unpermuted() {
    let path = write_tiny("permute", &tiny_llama(|_| {}));
    let checkpoint = LlamaCheckpoint::from_gguf(&path).unwrap();
    let w = &checkpoint.weights;
    let q = first_column(&w["model.layers.1.self_attn.q_proj.weight"]);
    assert_eq!(q, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    let k = first_column(&w["model.layers.0.self_attn.k_proj.weight"]);
    assert_eq!(k, [0.0, 2.0, 1.0, 3.0]);
    // Values and other tensors keep the file's row order.
    assert_eq!(
        first_column(&w["model.layers.0.self_attn.v_proj.weight"]),
        [0.0, 1.0, 2.0, 3.0]
    );
    assert_eq!(w["model.layers.0.mlp.down_proj.weight"].shape(), [8, 16]);
    assert_eq!(w.len(), 2 + 9 * TINY_LAYERS as usize);
    // One head of 8 rows: file row 2i + p goes to row 4p + i.
    let rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
    assert_eq!(
        unpermute_rows(&rows, 8, 1, 1),
        [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    );
    let c = &checkpoint.config;
    assert_eq!(
        (c.head_dim, c.kv_dim(), c.rms_norm_eps, c.rope_theta),
        (4, 4, 1e-6, 1e4)
    );
    let encoding = checkpoint
        .tokenizer
        .encode("ab c<|endoftext|>c", true)
        .unwrap();
    assert_eq!(encoding.get_tokens(), ["ab", "Ġc", "<|endoftext|>", "c"]);
    assert_eq!(encoding.get_ids(), [5, 6, 0, 3]);
}

/// Opening must fail with a message containing every one of `needles`.
fn load_error(test: &str, file: &GgufWriter, needles: &[&str]) {
    let path = write_tiny(test, file);
    let message = match LlamaCheckpoint::from_gguf(&path) {
        Ok(_) => panic!("{test}: a bad model loaded"),
        Err(e) => e.to_string(),
    };
    common::assert_error_says(test, &message, &path, needles);
}

fn tensor<'a>(file: &'a mut GgufWriter, name: &str) -> &'a mut common::gguf_writer::TensorEntry {
    file.tensors.iter_mut().find(|t| t.name == name).unwrap()
}

#[test]
fn bad_llama_files_are_named() {
    load_error(
        "architecture",
        &tiny_llama(|f| {
            f.string("general.architecture", "qwen2");
        }),
        &[
            "general.architecture `qwen2` is not supported",
            "supported: llama",
        ],
    );
    load_error(
        "ffn-disagrees",
        &tiny_llama(|f| {
            f.u32("llama.feed_forward_length", 20);
        }),
        &[
            "tensor `blk.0.ffn_gate.weight` has shape [16, 8]",
            "llama.feed_forward_length",
            "implies [20, 8]",
        ],
    );
    load_error(
        "kv-heads-disagree",
        &tiny_llama(|f| {
            f.u32("llama.attention.head_count_kv", 2);
        }),
        &[
            "tensor `blk.0.attn_k.weight` has shape [4, 8]",
            "head_count(_kv)",
            "implies [8, 8]",
        ],
    );
    load_error(
        "embedding-disagrees",
        &tiny_llama(|f| {
            let t = tensor(f, "token_embd.weight");
            t.dims = vec![HIDDEN, 5];
            t.data.truncate(5 * HIDDEN as usize * 4);
        }),
        &[
            "tensor `token_embd.weight` has shape [5, 8]",
            "llama.vocab_size",
            "implies [7, 8]",
        ],
    );
    load_error(
        "heads-not-multiple",
        &tiny_llama(|f| {
            f.u32("llama.attention.head_count_kv", 3);
        }),
        &["`llama.attention.head_count` 2 is not a multiple of `llama.attention.head_count_kv` 3"],
    );
    load_error(
        "rope-dims",
        &tiny_llama(|f| {
            f.u32("llama.rope.dimension_count", 2);
        }),
        &["`llama.rope.dimension_count` is 2 but the head dimension is 4"],
    );
    load_error(
        "odd-head-dim",
        &tiny_llama(|f| {
            f.u32("llama.attention.key_length", 3)
                .u32("llama.attention.value_length", 3)
                .u32("llama.rope.dimension_count", 3);
        }),
        &["the head dimension 3 is odd"],
    );
    load_error(
        "missing-key",
        &tiny_llama(|f| {
            f.string("llama.block_count", "two");
        }),
        &[
            "`llama.block_count` should be a non-negative integer",
            "string \"two\"",
        ],
    );
    load_error(
        "missing-tensor",
        &tiny_llama(|f| f.tensors.retain(|t| t.name != "blk.1.ffn_up.weight")),
        &["tensor `blk.1.ffn_up.weight` is missing"],
    );
    load_error(
        "extra-layer",
        &tiny_llama(|f| {
            f.f32_tensor("blk.2.attn_norm.weight", &[HIDDEN], &[1.0; HIDDEN as usize]);
        }),
        &["tensor `blk.2.attn_norm.weight` is not part of a 2-layer Llama model"],
    );
    load_error(
        "vocab-size",
        &tiny_llama(|f| {
            f.u32("llama.vocab_size", 9);
        }),
        &["tokenizer.ggml.tokens has 7 tokens but llama.vocab_size is 9"],
    );
    load_error(
        "pre-tokenizer",
        &tiny_llama(|f| {
            f.string("tokenizer.ggml.pre", "qwen2");
        }),
        &["tokenizer.ggml.pre `qwen2` is not supported", "smollm"],
    );
    load_error(
        "tokenizer-model",
        &tiny_llama(|f| {
            f.string("tokenizer.ggml.model", "llama");
        }),
        &["tokenizer.ggml.model `llama` is not supported"],
    );
    load_error(
        "merge-out-of-vocabulary",
        &tiny_llama(|f| {
            f.strings("tokenizer.ggml.merges", &["a z".into()]);
        }),
        &["do not form a BPE model"],
    );
    let valid = tiny_llama(|_| {}).bytes();
    let path = write_tiny("truncated", &tiny_llama(|_| {}));
    std::fs::write(&path, &valid[..valid.len() - 10]).unwrap();
    let message = LlamaCheckpoint::from_gguf(&path)
        .err()
        .expect("a truncated file loaded")
        .to_string();
    assert!(
        message.contains("truncated") && message.contains("tensor `blk.1.ffn_down.weight`"),
        "{message}"
    );
}

/// A file with its own LM head (`output.weight`) is not tied, and the head is kept.
#[test]
fn an_untied_head_is_kept() {
    let path = write_tiny(
        "untied",
        &tiny_llama(|f| {
            f.f32_tensor("output.weight", &[HIDDEN, 7], &[0.5; 7 * HIDDEN as usize]);
        }),
    );
    let checkpoint = LlamaCheckpoint::from_gguf(&path).unwrap();
    assert!(!checkpoint.config.tie_word_embeddings);
    assert_eq!(checkpoint.weights["lm_head.weight"].shape(), [7, 8]);
    assert_eq!(checkpoint.config.to_hf_json()["tie_word_embeddings"], false);
    let gguf = Gguf::open(&path).unwrap();
    assert_eq!(LlamaConfig::from_gguf(&gguf).unwrap(), checkpoint.config);
}

/// `convert` never writes over an existing folder without --force, replaces it with --force, and
/// leaves nothing behind when the input is bad.
#[test]
fn convert_refuses_and_replaces() {
    let dir = scratch("llama-convert-tiny");
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, tiny_llama(|_| {}).bytes()).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let refused = convert(&model, &out, false);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("already exists; pass --force"), "{stderr}");
    assert!(
        out.join("keep.txt").exists(),
        "the refused output was touched"
    );

    let forced = convert(&model, &out, true);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert!(!out.join("keep.txt").exists());
    let saved = safetensors::load(&out.join("model.safetensors"))
        .unwrap()
        .tensors;
    let loaded = LlamaCheckpoint::from_gguf(&model).unwrap();
    assert_eq!(saved.len(), loaded.weights.len());
    for (name, tensor) in &loaded.weights {
        assert_eq!(
            saved[name].to_vec::<f32>(),
            tensor.to_vec::<f32>(),
            "{name}"
        );
    }
    let config: BTreeMap<String, Value> =
        serde_json::from_value(read_json(&out.join("config.json"))).unwrap();
    assert_eq!(config["num_hidden_layers"], 2);
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-6));

    let bad = dir.join("bad.gguf");
    std::fs::write(
        &bad,
        tiny_llama(|f| {
            f.string("general.architecture", "mamba");
        })
        .bytes(),
    )
    .unwrap();
    let bad_out = dir.join("bad-out");
    let failed = convert(&bad, &bad_out, false);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("general.architecture `mamba` is not supported"),
        "{stderr}"
    );
    assert!(!bad_out.exists());
    let siblings: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    // tiny.gguf, out and bad.gguf: no staging folder is left behind.
    assert_eq!(siblings.len(), 3, "{siblings:?}");
}
