//! The Llama decoder on a device (the CUDA kernels on the emulator, or the GPU where
//! scripts/gpu_check.sh says there is one): a random 2-layer model with SmolLM2's head shape
//! (head_dim 64, 3 query heads per key/value head) gives the CPU's logits and gradients; decoding
//! through a KV cache there sends one token id up and reads one logits row back per step; and
//! `scalpel generate` / `perplexity --device emu` print what the CPU prints.

use std::collections::BTreeMap;
use std::path::Path;

use scalpel::autograd::ops;
use scalpel::models::llama::model::expected_tensors;
use scalpel::models::llama::{KvCache, Llama, LlamaConfig};
use scalpel::tensor::Tensor;

use crate::device::{accelerator, count, stats_of};
use crate::llama_gguf::{tiny_llama, write_tiny};

fn config() -> LlamaConfig {
    LlamaConfig {
        num_hidden_layers: 2,
        hidden_size: 192,
        num_attention_heads: 3,
        num_key_value_heads: 1,
        head_dim: 64,
        intermediate_size: 136,
        vocab_size: 97,
        max_position_embeddings: 64,
        rope_theta: 1e5,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
        pad_token_id: None,
    }
}

/// SplitMix64 values uniform in `[lo, hi)`.
fn uniform(seed: &mut u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            lo + (hi - lo) * ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

/// Norm weights around 1, matrices uniform in ±2/√fan_in (so attention is far from uniform).
fn random_llama() -> Llama {
    let config = config();
    let mut seed = 7;
    let weights: BTreeMap<String, Tensor> = expected_tensors(&config)
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let values = if shape.len() == 1 {
                uniform(&mut seed, n, 0.8, 1.2)
            } else {
                let a = 2.0 / (shape[1] as f32).sqrt();
                uniform(&mut seed, n, -a, a)
            };
            (name, Tensor::from_vec(&shape, values).unwrap())
        })
        .collect();
    Llama::new(config, weights, Path::new("random")).unwrap()
}

/// `max |a − b| / max |b|`.
fn rel_error(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_vec::<f64>(), b.to_vec::<f64>());
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Logits of two sequences and the gradient of their next-token loss for every weight.
fn logits_and_gradients(model: &mut Llama, ids: &[u32]) -> (Tensor, BTreeMap<String, Tensor>) {
    model.params.unfreeze(|_| true);
    let hidden = model.hidden_states(ids, 2, None).unwrap();
    let logits = model.logits(&hidden).unwrap();
    let vocab = model.config.vocab_size;
    let flat = ops::reshape(&logits, &[ids.len(), vocab]).unwrap();
    // Each position predicts the next id (the last one wraps: any target serves the gradient).
    let targets: Vec<usize> = (0..ids.len())
        .map(|i| ids[(i + 1) % ids.len()] as usize)
        .collect();
    let grads = ops::cross_entropy(&flat, &targets)
        .unwrap()
        .backward()
        .unwrap();
    let grads = model
        .params
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            (name.to_string(), g.clone())
        })
        .collect();
    (logits.value().clone(), grads)
}

#[test]
fn a_llama_on_the_device_gives_the_cpus_logits_and_gradients() {
    let (_, on) = accelerator();
    let ids: Vec<u32> = (0..2 * 11).map(|i| (i * 37 + 5) % 97).collect();
    let (cpu_logits, cpu_grads) = logits_and_gradients(&mut random_llama(), &ids);
    let mut model = random_llama();
    model.to_device(&on).unwrap();
    let (logits, grads) = logits_and_gradients(&mut model, &ids);
    assert_eq!(logits.device(), on);
    let scale = cpu_logits
        .to_vec::<f32>()
        .iter()
        .fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(scale > 1.0, "logits too flat to test anything: {scale}");
    let diff = logits
        .to_vec::<f32>()
        .iter()
        .zip(cpu_logits.to_vec::<f32>())
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4, "max |Δlogit| {diff:e}");
    assert_eq!(grads.len(), cpu_grads.len());
    let mut worst = 0.0f64;
    for (name, g) in &grads {
        assert_eq!(g.device(), on, "{name}");
        let e = rel_error(g, &cpu_grads[name]);
        assert!(e <= 1e-4, "{name}: gradient error {e:e}");
        worst = worst.max(e);
    }
    eprintln!(
        "device vs cpu: max |Δlogit| {diff:e} (logits up to {scale:.1}), worst gradient error {worst:e}"
    );
}

#[test]
fn decoding_on_the_device_moves_one_token_up_and_one_logits_row_back() {
    let (_, on) = accelerator();
    let cpu = random_llama();
    let mut model = random_llama();
    model.to_device(&on).unwrap();
    let stats = || on.stats().unwrap();
    let (mut cpu_cache, mut cache) = (KvCache::new(&cpu.config), KvCache::new(&model.config));
    let prompt = [3, 14, 15, 92, 65];
    let before = stats();
    let (want, got) = (
        cpu.next_token_logits(&prompt, &mut cpu_cache).unwrap(),
        model.next_token_logits(&prompt, &mut cache).unwrap(),
    );
    let prefill = stats().since(&before);
    let row = 4 * model.config.vocab_size as u64;
    assert_eq!((prefill.h2d_bytes, prefill.d2h_bytes), (4 * 5, row));
    let mut worst = max_diff(&got, &want);
    for token in [35, 89, 79] {
        let before = stats();
        let got = model.next_token_logits(&[token], &mut cache).unwrap();
        let step = stats().since(&before);
        assert_eq!(
            (step.h2d_bytes, step.d2h_bytes),
            (4, row),
            "a decoding step sends its token id and reads back the logits only"
        );
        let want = cpu.next_token_logits(&[token], &mut cpu_cache).unwrap();
        worst = worst.max(max_diff(&got, &want));
    }
    assert_eq!(cache.len(), 8);
    eprintln!("KV-cache decoding, device vs cpu: max |Δlogit| {worst:e}");
    assert!(worst <= 1e-4, "max |Δlogit| {worst:e}");
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// The bytes of the model's (f32) weights, each uploaded once.
fn weight_bytes(model: &Llama) -> u64 {
    model
        .params
        .iter()
        .map(|(_, v)| 4 * v.value().numel() as u64)
        .sum()
}

fn scalpel(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn generate_and_perplexity_on_the_emulator_print_what_the_cpu_prints() {
    let path = write_tiny("device_generate", &tiny_llama(|_| {}));
    let model = path.to_str().unwrap();
    let stats = path.with_file_name("stats.json");
    let stats_arg = stats.to_str().unwrap();
    let generate = [
        "generate",
        "--model",
        model,
        "--prompt",
        "a c",
        "--max-tokens",
        "3",
    ];
    let cpu = scalpel(&[&["--device", "cpu"][..], &generate].concat());
    assert!(
        cpu.status.success(),
        "{}",
        String::from_utf8_lossy(&cpu.stderr)
    );
    let emu = scalpel(
        &[
            &["--device", "emu", "--device-stats", stats_arg][..],
            &generate,
        ]
        .concat(),
    );
    let stderr = String::from_utf8_lossy(&emu.stderr);
    assert!(emu.status.success(), "{stderr}");
    assert!(stderr.contains("device: emu"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&emu.stdout),
        String::from_utf8_lossy(&cpu.stdout)
    );
    // The weights once, the prompt's ids, then one id per step; one logits row per forward.
    let tiny = scalpel::models::llama::LlamaCheckpoint::load(&path)
        .unwrap()
        .model(&path)
        .unwrap();
    let number_before = |what: &str| -> u64 {
        stderr
            .split(what)
            .next()
            .and_then(|s| s.rsplit([' ', '(', '\n']).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no `{what}` count in {stderr}"))
    };
    let (generated, prompt_tokens) = (number_before(" tokens in"), number_before(" prompt tokens"));
    // One forward per token chosen: the last generated one, or the end-of-text token that
    // stopped the run early.
    let forwards = if generated == 3 { 3 } else { generated + 1 };
    let json = stats_of(&stats);
    let vocab = tiny.config.vocab_size as u64;
    assert_eq!(count(&json, "d2h_bytes"), forwards * 4 * vocab, "{json}");
    assert_eq!(
        count(&json, "h2d_bytes"),
        weight_bytes(&tiny) + 4 * prompt_tokens + 4 * (forwards - 1),
        "{json}"
    );

    let text = path.with_file_name("text.txt");
    std::fs::write(&text, "a c a a c c a c a").unwrap();
    let perplexity = [
        "perplexity",
        "--model",
        model,
        "--text",
        text.to_str().unwrap(),
        "--context",
        "4",
        "--stride",
        "2",
    ];
    let cpu = scalpel(&[&["--device", "cpu"][..], &perplexity].concat());
    let emu = scalpel(&[&["--device", "emu"][..], &perplexity].concat());
    assert!(
        emu.status.success(),
        "{}",
        String::from_utf8_lossy(&emu.stderr)
    );
    let value = |out: &std::process::Output| -> f64 {
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (c, e) = (value(&cpu), value(&emu));
    assert!((c - e).abs() <= 1e-4 * c, "perplexity cpu {c} vs emu {e}");
}
