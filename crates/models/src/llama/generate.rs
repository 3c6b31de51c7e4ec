//! Autoregressive decoding with a [`KvCache`]: the prompt in one forward, then one token per
//! step, each chosen greedily or sampled (temperature, nucleus).

use super::{KvCache, Llama};
use crate::{ModelError, Result};

/// How the next token is chosen. A temperature of 0 is greedy (the first most likely token, as
/// `torch.argmax`).
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub temperature: f64,
    /// Nucleus sampling: only the most likely tokens whose probabilities sum to `top_p` are drawn
    /// from (1 keeps all).
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    };
}

/// SplitMix64: a small, seedable generator, so a `--seed` reproduces a sample exactly.
struct SplitMix64(u64);

impl SplitMix64 {
    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from `softmax(logits / temperature)` restricted to the nucleus `top_p`.
fn sample(logits: &[f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            (
                i as u32,
                ((f64::from(x) - f64::from(max)) / s.temperature).exp(),
            )
        })
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let nucleus = probs
        .iter()
        .position(|p| {
            kept += p.1 / total;
            kept >= s.top_p
        })
        .map_or(probs.len(), |last| last + 1);
    let probs = &probs[..nucleus];
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * mass;
    for &(id, p) in probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs[probs.len() - 1].0
}

/// Generates up to `max_tokens` tokens after `prompt`, calling `on_token` with each as soon as
/// it is chosen; stops early at any of `stop` (which is not returned) or when the model's
/// context is full. A prompt that does not fit in the context is an error.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &Sampling,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let context = model.config.max_position_embeddings;
    if prompt.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    if prompt.len() > context {
        return Err(ModelError::Input(format!(
            "the prompt is {} tokens, longer than the model's context of {context}",
            prompt.len()
        )));
    }
    let mut cache = KvCache::new(&model.config);
    let mut rng = SplitMix64(sampling.seed);
    let mut out = Vec::new();
    let mut logits = model.next_token_logits(prompt, &mut cache)?;
    while out.len() < max_tokens {
        let next = if sampling.temperature == 0.0 {
            argmax(&logits)
        } else {
            sample(&logits, sampling, &mut rng)
        };
        if stop.contains(&next) {
            break;
        }
        out.push(next);
        on_token(next)?;
        if out.len() == max_tokens || cache.len() == context {
            break;
        }
        logits = model.next_token_logits(&[next], &mut cache)?;
    }
    Ok(out)
}
