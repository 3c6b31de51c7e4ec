//! A GGUF file's Llama tensors under their Hugging Face names, dequantized to f32, with the
//! query/key rows back in Hugging Face order and every shape checked against the config.

use std::collections::BTreeMap;

use scalpel_tensor::gguf::Gguf;
use scalpel_tensor::Tensor;

use super::LlamaConfig;
use crate::{ModelError, Result};

/// The GGUF name of each per-layer tensor (after `blk.N.`) and its Hugging Face name (after
/// `model.layers.N.`).
const LAYER_TENSORS: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Where a GGUF tensor goes: its Hugging Face name, the shape the config implies (with the
/// metadata that implies it, for the error), and the head count its rows are permuted over.
struct Target {
    hf_name: String,
    shape: Vec<usize>,
    implied_by: &'static str,
    permuted_heads: Option<usize>,
}

fn target(gguf_name: &str, c: &LlamaConfig) -> Option<Target> {
    let (h, kv, ffn, vocab) = (c.hidden_size, c.kv_dim(), c.intermediate_size, c.vocab_size);
    let q = c.num_attention_heads * c.head_dim;
    let plain = |hf_name: String, shape: Vec<usize>, implied_by| Target {
        hf_name,
        shape,
        implied_by,
        permuted_heads: None,
    };
    const HIDDEN: &str = "llama.embedding_length";
    const HEADS: &str = "llama.embedding_length, llama.attention.head_count";
    const KV: &str = "llama.embedding_length, llama.attention.head_count(_kv)";
    const FFN: &str = "llama.embedding_length, llama.feed_forward_length";
    const VOCAB: &str = "llama.embedding_length, llama.vocab_size";
    match gguf_name {
        "token_embd.weight" => {
            return Some(plain(
                "model.embed_tokens.weight".into(),
                vec![vocab, h],
                VOCAB,
            ))
        }
        "output_norm.weight" => return Some(plain("model.norm.weight".into(), vec![h], HIDDEN)),
        "output.weight" => return Some(plain("lm_head.weight".into(), vec![vocab, h], VOCAB)),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer_text, suffix) = rest.split_once('.')?;
    let layer: usize = layer_text.parse().ok()?;
    if layer >= c.num_hidden_layers || layer.to_string() != layer_text {
        return None;
    }
    let (_, hf_suffix) = LAYER_TENSORS.iter().find(|(g, _)| *g == suffix)?;
    let hf_name = format!("model.layers.{layer}.{hf_suffix}");
    Some(match suffix {
        "attn_norm.weight" | "ffn_norm.weight" => plain(hf_name, vec![h], HIDDEN),
        "attn_q.weight" => Target {
            permuted_heads: Some(c.num_attention_heads),
            ..plain(hf_name, vec![q, h], HEADS)
        },
        "attn_k.weight" => Target {
            permuted_heads: Some(c.num_key_value_heads),
            ..plain(hf_name, vec![kv, h], KV)
        },
        "attn_v.weight" => plain(hf_name, vec![kv, h], KV),
        "attn_output.weight" => plain(hf_name, vec![h, q], HEADS),
        "ffn_gate.weight" | "ffn_up.weight" => plain(hf_name, vec![ffn, h], FFN),
        "ffn_down.weight" => plain(hf_name, vec![h, ffn], FFN),
        _ => unreachable!("every name of LAYER_TENSORS has a shape"),
    })
}

/// Undoes the row permutation llama.cpp's converter applies to the query and key projections
/// (transformers' `reverse_permute_weights`): within each of `heads` heads of `head_rows` rows,
/// the file interleaves the two rotary halves, so file row `2i + p` is Hugging Face row
/// `p·head_rows/2 + i`.
pub fn unpermute_rows(values: &[f32], rows: usize, columns: usize, heads: usize) -> Vec<f32> {
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![0.0; values.len()];
    for head in 0..heads {
        for i in 0..half {
            for p in 0..2 {
                let from = head * head_rows + 2 * i + p;
                let to = head * head_rows + p * half + i;
                out[to * columns..(to + 1) * columns]
                    .copy_from_slice(&values[from * columns..(from + 1) * columns]);
            }
        }
    }
    out
}

/// Every tensor of the file under its Hugging Face name, as f32. A tensor that is not part of a
/// Llama model, one the config needs that is missing, or one whose shape disagrees with the
/// metadata is an error naming it.
pub fn load_weights(gguf: &Gguf, config: &LlamaConfig) -> Result<BTreeMap<String, Tensor>> {
    let path = gguf.path().to_path_buf();
    let mut weights = BTreeMap::new();
    for info in &gguf.tensors {
        let Some(target) = target(&info.name, config) else {
            return Err(ModelError::Config {
                path,
                detail: format!(
                    "tensor `{}` is not part of a {}-layer Llama model",
                    info.name, config.num_hidden_layers
                ),
            });
        };
        let shape = info.shape();
        if shape != target.shape {
            return Err(ModelError::Config {
                path,
                detail: format!(
                    "tensor `{}` has shape {shape:?}, but the metadata ({}) implies {:?}",
                    info.name, target.implied_by, target.shape
                ),
            });
        }
        let mut values = gguf.dequantize(info);
        if let Some(heads) = target.permuted_heads {
            values = unpermute_rows(&values, shape[0], shape[1], heads);
        }
        weights.insert(target.hf_name, Tensor::from_vec(&shape, values)?);
    }
    let mut expected = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    if !config.tie_word_embeddings {
        expected.push("output.weight".into());
    }
    for layer in 0..config.num_hidden_layers {
        expected.extend(
            LAYER_TENSORS
                .iter()
                .map(|(g, _)| format!("blk.{layer}.{g}")),
        );
    }
    if let Some(missing) = expected
        .into_iter()
        .find(|name| gguf.tensor_info(name).is_none())
    {
        return Err(ModelError::MissingTensor {
            path,
            name: missing,
        });
    }
    Ok(weights)
}
