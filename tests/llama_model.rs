//! The Llama decoder on the real SmolLM2 GGUF against transformers (fixtures from
//! scripts/reference/make_llama_model_fixtures.py): logits, KV-cache decoding, 64-token greedy
//! generation, the chat template, sliding-window perplexity through `scalpel perplexity`; and
//! on tiny synthetic files: the converted folder runs like its GGUF, a prompt longer than the
//! context is an error naming both lengths, `scalpel generate` streams and reports its speed.

use crate::common;

use std::sync::OnceLock;

use common::{fixture, load_fixture, scratch};
use scalpel::models::llama::chat::{apply_chat_template, Message};
use scalpel::models::llama::generate::{generate, Sampling};
use scalpel::models::llama::{KvCache, Llama, LlamaCheckpoint};
use serde_json::Value;

use crate::llama_gguf::{scalpel, tiny_llama, write_tiny};

struct Loaded {
    model: Llama,
    /// The rest of the checkpoint (tokenizer, chat template); its weights are the model's.
    checkpoint: LlamaCheckpoint,
}

/// The real file decoded once for every test here (about 0.6 GB of f32).
fn smollm2() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let path = common::smollm2_gguf();
        let mut checkpoint = LlamaCheckpoint::load(&path).unwrap();
        let model = checkpoint.model(&path).unwrap();
        Loaded { model, checkpoint }
    })
}

fn read_json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn encode(checkpoint: &LlamaCheckpoint, text: &str) -> Vec<u32> {
    checkpoint
        .tokenizer
        .encode(text, false)
        .unwrap()
        .get_ids()
        .to_vec()
}

/// Logits `[seq, vocab]` of one sequence, no cache.
fn full_logits(model: &Llama, ids: &[u32]) -> Vec<f32> {
    let hidden = model.hidden_states(ids, 1, None).unwrap();
    model.logits(&hidden).unwrap().value().to_vec::<f32>()
}

/// transformers' logits at the last two positions of each prompt, over a slice of the
/// vocabulary, to 1e-4 (the bound).
#[test]
fn logits_match_transformers() {
    let model = &smollm2().model;
    let want = load_fixture("llama/logits.safetensors");
    let vocab = model.config.vocab_size;
    let mut worst = 0.0f32;
    for i in 0.. {
        let Some(ids) = want.get(&format!("prompt{i}.ids")) else {
            assert_eq!(i, 3, "the fixture has three prompts");
            break;
        };
        let ids: Vec<u32> = ids.to_vec::<i64>().into_iter().map(|t| t as u32).collect();
        let vocab_ids = want[&format!("prompt{i}.vocab_ids")].to_vec::<i64>();
        let expected = want[&format!("prompt{i}.logits")].to_vec::<f32>();
        let logits = full_logits(model, &ids);
        let seq = ids.len();
        for (p, row) in (seq - 2..seq).enumerate() {
            for (j, &v) in vocab_ids.iter().enumerate() {
                let got = logits[row * vocab + v as usize];
                let diff = (got - expected[p * vocab_ids.len() + j]).abs();
                assert!(diff.is_finite(), "prompt {i}: logit {v} is {got}");
                worst = worst.max(diff);
            }
        }
    }
    eprintln!("max |Δlogit| against transformers: {worst:e}");
    assert!(worst <= 1e-4, "max |Δlogit| {worst:e} > 1e-4");
}

/// With bf16 linear weights (products accumulated in f32) the logits stay close to
/// transformers' f32 ones and the next token is the same at every fixture position checked.
#[test]
fn bf16_linear_layers_track_the_f32_logits() {
    let path = common::smollm2_gguf();
    let mut checkpoint = LlamaCheckpoint::load(&path).unwrap();
    let mut model = checkpoint.model(&path).unwrap();
    model.params.freeze(|_| true);
    model
        .set_linear_dtype(scalpel::tensor::DType::BF16)
        .unwrap();
    let head = model.params.get("lm_head.weight").unwrap().value();
    assert_eq!(
        head.dtype(),
        scalpel::tensor::DType::BF16,
        "the tied head's copy"
    );
    let table = model
        .params
        .get("model.embed_tokens.weight")
        .unwrap()
        .value();
    assert_eq!(
        table.dtype(),
        scalpel::tensor::DType::F32,
        "the lookup table"
    );
    let want = load_fixture("llama/logits.safetensors");
    let f32_model = &smollm2().model;
    let vocab = model.config.vocab_size;
    let (mut worst, mut worst_f32) = (0.0f32, 0.0f32);
    for i in 0..3 {
        let ids: Vec<u32> = want[&format!("prompt{i}.ids")]
            .to_vec::<i64>()
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let (bf16, f32) = (full_logits(&model, &ids), full_logits(f32_model, &ids));
        let vocab_ids = want[&format!("prompt{i}.vocab_ids")].to_vec::<i64>();
        let expected = want[&format!("prompt{i}.logits")].to_vec::<f32>();
        let seq = ids.len();
        for (p, row) in (seq - 2..seq).enumerate() {
            for (j, &v) in vocab_ids.iter().enumerate() {
                let got = bf16[row * vocab + v as usize];
                worst = worst.max((got - expected[p * vocab_ids.len() + j]).abs());
            }
        }
        for row in 0..seq {
            let r = row * vocab..(row + 1) * vocab;
            let argmax = |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
            let (a, b) = (argmax(&bf16[r.clone()]), argmax(&f32[r.clone()]));
            let scale = f32[r.clone()].iter().fold(0.0f32, |m, x| m.max(x.abs()));
            worst_f32 = worst_f32.max(common::max_abs_diff(&bf16[r.clone()], &f32[r]) / scale);
            assert_eq!(
                a, b,
                "prompt {i} position {row}: the bf16 model's next token"
            );
        }
    }
    // Measured: 0.25 against transformers (logits of magnitude ~20), 1.5 % of the row's largest
    // logit against our f32; bf16 keeps 8 significant bits, so twice that is the bound.
    eprintln!("bf16: max |Δlogit| against transformers {worst}, relative to our f32 {worst_f32}");
    assert!(worst <= 0.5, "max |Δlogit| {worst} against transformers");
    assert!(
        worst_f32 <= 0.03,
        "{worst_f32} of the largest logit against f32"
    );
}

/// Prefill then one token at a time through the cache gives the logits of one full forward.
#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    let Loaded { model, checkpoint } = smollm2();
    let ids = encode(checkpoint, "The quick brown fox jumps over the lazy dog");
    let vocab = model.config.vocab_size;
    let full = full_logits(model, &ids);
    let mut cache = KvCache::new(&model.config);
    let split = 4;
    let mut worst = 0.0f32;
    for end in split..=ids.len() {
        let step = if end == split {
            &ids[..split]
        } else {
            &ids[end - 1..end]
        };
        let logits = model.next_token_logits(step, &mut cache).unwrap();
        assert_eq!(cache.len(), end);
        let row = &full[(end - 1) * vocab..end * vocab];
        worst = worst.max(common::max_abs_diff(&logits, row));
    }
    // One-row steps take the GEMM's unpacked dot-product path, the full forward the packed one:
    // their f32 sums differ in order (measured 1.1e-4 on logits of magnitude ~20).
    eprintln!("cached decoding against the full forward: max |Δlogit| {worst:e}");
    assert!(worst <= 3e-4, "cached decoding differs by {worst:e}");
}

/// Greedy decoding of a chat answer equals transformers' `generate(do_sample=False)` for all 64
/// tokens (stopping at the end-of-turn token, which transformers did not reach either).
#[test]
fn greedy_generation_matches_transformers() {
    let Loaded { model, checkpoint } = smollm2();
    let want = read_json("llama/greedy.json");
    let prompt = ids_of(&want["prompt_ids"]);
    assert_eq!(
        encode(checkpoint, want["chat_text"].as_str().unwrap()),
        prompt
    );
    let expected = ids_of(&want["generated_ids"]);
    let eos: Vec<u32> = model.config.eos_token_id.into_iter().collect();
    let mut streamed = Vec::new();
    let got = generate(model, &prompt, 64, &Sampling::GREEDY, &eos, |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(got, streamed, "every token is streamed as it is chosen");
    let matching = got
        .iter()
        .zip(&expected)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "greedy tokens equal to transformers': {matching} of {}",
        expected.len()
    );
    assert_eq!((matching, got.len()), (64, 64), "got {got:?}");
}

/// A seeded sample is reproducible, differs from greedy, and a tiny nucleus is greedy.
#[test]
fn sampling_is_seeded_and_top_p_narrows_it() {
    let Loaded { model, checkpoint } = smollm2();
    let prompt = encode(checkpoint, "My favourite colour is");
    let run = |sampling: Sampling| generate(model, &prompt, 8, &sampling, &[], |_| Ok(())).unwrap();
    let hot = Sampling {
        temperature: 1.5,
        top_p: 1.0,
        seed: 7,
    };
    assert_eq!(run(hot), run(hot));
    assert_ne!(run(hot), run(Sampling { seed: 8, ..hot }));
    let narrow = Sampling { top_p: 1e-9, ..hot };
    assert_eq!(run(narrow), run(Sampling::GREEDY));
}

/// The GGUF's chat template renders a conversation as transformers' `apply_chat_template`.
#[test]
fn chat_template_matches_transformers() {
    let Loaded { checkpoint, .. } = smollm2();
    let want = read_json("llama/greedy.json");
    let template = checkpoint
        .chat_template()
        .expect("the file has a chat template");
    let messages = [Message {
        role: "user".into(),
        content: want["message"].as_str().unwrap().into(),
    }];
    let text =
        apply_chat_template(template, &messages, true, "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(text, want["chat_text"].as_str().unwrap());
    assert_eq!(encode(checkpoint, &text), ids_of(&want["prompt_ids"]));
}

/// `scalpel perplexity --json` on a wikitext-2 slice against the transformers perplexity guide's
/// loop over the same windows and tokens, within 0.1 %.
#[test]
fn perplexity_matches_transformers() {
    let want = read_json("llama/perplexity.json");
    let lines = want["lines"].as_u64().unwrap() as usize;
    let source = common::repo().join("../shared/data/text/wikitext-2/valid.txt");
    let text: String = std::fs::read_to_string(&source)
        .unwrap_or_else(|e| panic!("{}: {e}", source.display()))
        .split('\n')
        .take(lines)
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(encode(&smollm2().checkpoint, &text), ids_of(&want["ids"]));
    let file = scratch("llama-perplexity").join("slice.txt");
    std::fs::write(&file, &text).unwrap();
    let model = common::smollm2_gguf();
    let out = scalpel(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--text",
        file.to_str().unwrap(),
        "--context",
        "256",
        "--stride",
        "128",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (windows, expected) = (
        got["windows"].as_array().unwrap(),
        want["windows"].as_array().unwrap(),
    );
    assert_eq!(windows.len(), expected.len());
    for (w, e) in windows.iter().zip(expected) {
        for key in ["begin", "end", "scored"] {
            assert_eq!(w[key], e[key], "window {e}: {key}");
        }
        let (g, e) = (
            w["mean_nll"].as_f64().unwrap(),
            e["mean_nll"].as_f64().unwrap(),
        );
        assert!((g - e).abs() <= 1e-3 * e, "window mean NLL {g} against {e}");
    }
    let ratio = got["perplexity"].as_f64().unwrap() / want["perplexity"].as_f64().unwrap();
    eprintln!("perplexity ratio to transformers: {ratio}");
    assert!((ratio - 1.0).abs() <= 1e-3, "perplexity ratio {ratio}");
    assert_eq!(got["tokens_scored"], want["tokens_scored"]);
}

fn tiny_model(test: &str) -> (std::path::PathBuf, Llama, LlamaCheckpoint) {
    let path = write_tiny(test, &tiny_llama(|_| {}));
    let mut checkpoint = LlamaCheckpoint::load(&path).unwrap();
    let model = checkpoint.model(&path).unwrap();
    (path, model, checkpoint)
}

/// `scalpel convert` of a tiny file into a `converted` folder beside it.
fn convert_tiny(path: &std::path::Path) -> std::path::PathBuf {
    let folder = path.with_file_name("converted");
    let out = scalpel(&[
        "convert",
        "--model",
        path.to_str().unwrap(),
        "--output",
        folder.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    folder
}

/// `scalpel convert`'s folder loads as a Llama and computes the GGUF's logits exactly.
#[test]
fn converted_folder_runs_like_its_gguf() {
    let (path, from_gguf, _) = tiny_model("converted-runs");
    let folder = convert_tiny(&path);
    let mut checkpoint = LlamaCheckpoint::load(&folder).unwrap();
    let from_folder = checkpoint.model(&folder).unwrap();
    assert_eq!(from_folder.config, from_gguf.config);
    let ids = [1, 2, 3, 5, 6];
    let (a, b) = (
        full_logits(&from_gguf, &ids),
        full_logits(&from_folder, &ids),
    );
    assert_eq!(a, b);
}

/// A prompt longer than the context fails naming both lengths, in the library and the CLI.
#[test]
fn a_prompt_longer_than_the_context_is_an_error() {
    let (path, model, _) = tiny_model("long-prompt");
    let context = model.config.max_position_embeddings;
    let prompt = vec![1u32; context + 1];
    let err = generate(&model, &prompt, 4, &Sampling::GREEDY, &[], |_| Ok(()))
        .expect_err("a prompt over the context")
        .to_string();
    assert!(
        err.contains(&format!(
            "{} tokens, longer than the model's context of {context}",
            context + 1
        )),
        "{err}"
    );
    let hidden = model
        .hidden_states(&prompt, 1, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        hidden.contains("exceed the model's context of 32"),
        "{hidden}"
    );
    // "a" is one token of the tiny vocabulary.
    let text = "a".repeat(context + 1);
    let out = scalpel(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        &text,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the prompt is 33 tokens, longer than the model's context of 32"),
        "{stderr}"
    );
}

/// `scalpel generate` streams the continuation to stdout (the library's greedy tokens, decoded)
/// and its speed to stderr; sampling flags out of range are refused by name.
#[test]
fn generate_command_streams_and_reports_speed() {
    let (path, model, checkpoint) = tiny_model("generate-cli");
    let path = path.to_str().unwrap();
    let out = scalpel(&[
        "generate",
        "--model",
        path,
        "--prompt",
        "ab c",
        "--max-tokens",
        "5",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
    let prompt = encode(&checkpoint, "ab c");
    let eos = model.config.eos_token_id.into_iter().collect::<Vec<_>>();
    let tokens = generate(&model, &prompt, 5, &Sampling::GREEDY, &eos, |_| Ok(())).unwrap();
    let text = checkpoint.tokenizer.decode(&tokens, true).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{text}\n"));
    for (flag, value) in [
        ("--temperature", "-1"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
    ] {
        let out = scalpel(&[
            "generate",
            "--model",
            path,
            "--prompt",
            "a",
            &format!("{flag}={value}"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(flag),
            "{flag} {value}: {stderr}"
        );
    }
}

/// A converted folder whose config or weights disagree with what a Llama needs is refused,
/// naming the file and the field or tensor.
#[test]
fn bad_llama_folders_are_named() {
    let (path, _, _) = tiny_model("bad-folders");
    let folder = convert_tiny(&path);
    let config_path = folder.join("config.json");
    let original: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let cases: [(&str, &str, Value, &str); 4] = [
        (
            "architecture",
            "architectures",
            serde_json::json!(["MistralForCausalLM"]),
            "is not supported (supported: LlamaForCausalLM)",
        ),
        (
            "heads",
            "num_key_value_heads",
            serde_json::json!(3),
            "num_attention_heads 2 is not a multiple of num_key_value_heads 3",
        ),
        (
            "rope scaling",
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "rope scaling `yarn` is not supported",
        ),
        (
            "ffn width",
            "intermediate_size",
            serde_json::json!(12),
            "mlp.gate_proj.weight` has shape [16, 8], the config implies [12, 8]",
        ),
    ];
    for (case, key, value, needle) in cases {
        let mut config = original.clone();
        config[key] = value;
        std::fs::write(&config_path, serde_json::to_string(&config).unwrap()).unwrap();
        let message = match LlamaCheckpoint::load(&folder).and_then(|mut c| c.model(&folder)) {
            Ok(_) => panic!("{case}: the folder loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            message.contains(needle),
            "{case}: `{message}` lacks `{needle}`"
        );
        assert!(
            message.contains(&folder.display().to_string()),
            "{case}: `{message}` names no file"
        );
    }
}
