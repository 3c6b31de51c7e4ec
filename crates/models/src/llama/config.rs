//! A Llama-family config read from a GGUF file's `llama.*` metadata, and its Hugging Face
//! `config.json` form.

use scalpel_tensor::gguf::Gguf;
use serde_json::json;

use crate::{ModelError, Result};

/// The architectures this module reads (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: [&str; 1] = ["llama"];

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub num_hidden_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// The LM head is the token embedding (the file has no `output.weight`).
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// The decimal a person wrote for an f32 field (1e-5 rather than 9.999999747378752e-06): the
/// shortest one that reads back to the same f32.
fn written_decimal(v: f64) -> f64 {
    let single = v as f32;
    if f64::from(single) == v {
        single
            .to_string()
            .parse()
            .expect("an f32 prints as a valid f64")
    } else {
        v
    }
}

impl LlamaConfig {
    pub fn from_gguf(gguf: &Gguf) -> Result<LlamaConfig> {
        let invalid = |detail: String| ModelError::Config {
            path: gguf.path().to_path_buf(),
            detail,
        };
        let architecture = gguf.require_str("general.architecture")?;
        if !SUPPORTED_ARCHITECTURES.contains(&architecture) {
            return Err(invalid(format!(
                "general.architecture `{architecture}` is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let key = |name: &str| format!("{architecture}.{name}");
        let optional = |name: &str| gguf.metadata.get(&key(name));
        let count = |name: &str| -> Result<usize> {
            let value = gguf.require_u64(&key(name))?;
            match usize::try_from(value) {
                Ok(v) if v > 0 => Ok(v),
                _ => Err(invalid(format!(
                    "`{}` is {value}, not a usable size",
                    key(name)
                ))),
            }
        };
        let optional_count = |name: &str| -> Result<Option<usize>> {
            optional(name).map(|_| count(name)).transpose()
        };
        let float = |name: &str| gguf.require_f64(&key(name)).map(written_decimal);

        let hidden_size = count("embedding_length")?;
        let num_attention_heads = count("attention.head_count")?;
        let num_key_value_heads =
            optional_count("attention.head_count_kv")?.unwrap_or(num_attention_heads);
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(format!(
                "`{}` {num_attention_heads} is not a multiple of `{}` {num_key_value_heads}",
                key("attention.head_count"),
                key("attention.head_count_kv")
            )));
        }
        let head_dim = match optional_count("attention.key_length")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(invalid(format!(
                    "`{}` {hidden_size} is not a multiple of `{}` {num_attention_heads}",
                    key("embedding_length"),
                    key("attention.head_count")
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(format!(
                "the head dimension {head_dim} is odd: rotary embeddings rotate pairs"
            )));
        }
        for other in ["attention.value_length", "rope.dimension_count"] {
            if let Some(d) = optional_count(other)? {
                if d != head_dim {
                    return Err(invalid(format!(
                        "`{}` is {d} but the head dimension is {head_dim} (partial rotary \
                         embeddings and unequal key/value heads are not supported)",
                        key(other)
                    )));
                }
            }
        }
        if let Some(scaling) = optional("rope.scaling.type") {
            if scaling.as_str() != Some("none") {
                return Err(invalid(format!(
                    "`{}` {} is not supported (only unscaled rotary embeddings)",
                    key("rope.scaling.type"),
                    scaling.describe()
                )));
            }
        }
        let vocab_size = match optional_count("vocab_size")? {
            Some(v) => v,
            None => gguf.require_array("tokenizer.ggml.tokens")?.len(),
        };
        let token_id = |name: &str| -> Result<Option<u32>> {
            let key = format!("tokenizer.ggml.{name}");
            let Some(value) = gguf.metadata.get(&key) else {
                return Ok(None);
            };
            match value.as_u64().and_then(|id| u32::try_from(id).ok()) {
                Some(id) if (id as usize) < vocab_size => Ok(Some(id)),
                _ => Err(invalid(format!(
                    "`{key}` is {}, not a token id below the vocabulary size {vocab_size}",
                    value.describe()
                ))),
            }
        };
        Ok(LlamaConfig {
            num_hidden_layers: count("block_count")?,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: count("feed_forward_length")?,
            vocab_size,
            max_position_embeddings: count("context_length")?,
            // llama.cpp's defaults when a file leaves these out.
            rope_theta: optional("rope.freq_base")
                .map_or(Ok(10000.0), |_| float("rope.freq_base"))?,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon")?,
            tie_word_embeddings: gguf.tensor_info("output.weight").is_none(),
            bos_token_id: token_id("bos_token_id")?,
            eos_token_id: token_id("eos_token_id")?,
            pad_token_id: token_id("padding_token_id")?,
        })
    }

    /// Reads a Hugging Face `config.json` of a `LlamaForCausalLM` (what `scalpel convert`
    /// writes). Anything this implementation does not compute (scaled or partial rotary
    /// embeddings, biases, another activation) is an error naming the field.
    pub fn from_hf_json(raw: &serde_json::Value, path: &std::path::Path) -> Result<LlamaConfig> {
        let invalid = |detail: String| ModelError::Config {
            path: path.to_path_buf(),
            detail,
        };
        let architectures: Vec<&str> = raw["architectures"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        if !architectures.contains(&"LlamaForCausalLM") {
            return Err(invalid(format!(
                "architectures {architectures:?} is not supported (supported: LlamaForCausalLM)"
            )));
        }
        let count = |key: &str| -> Result<Option<usize>> {
            match &raw[key] {
                serde_json::Value::Null => Ok(None),
                v => match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(invalid(format!("`{key}` is {v}, not a usable size"))),
                },
            }
        };
        let required = |key: &str| -> Result<usize> {
            count(key)?.ok_or_else(|| invalid(format!("`{key}` is missing")))
        };
        let hidden_size = required("hidden_size")?;
        let num_attention_heads = required("num_attention_heads")?;
        let num_key_value_heads = count("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(invalid(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of \
                 num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = match count("head_dim")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_attention_heads) => {
                hidden_size / num_attention_heads
            }
            None => {
                return Err(invalid(format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads \
                     {num_attention_heads}"
                )))
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "head_dim {head_dim} is odd: rotary embeddings rotate pairs"
            )));
        }
        let act = raw["hidden_act"].as_str().unwrap_or("silu");
        if act != "silu" {
            return Err(invalid(format!(
                "hidden_act `{act}` is not supported (only silu)"
            )));
        }
        for key in ["attention_bias", "mlp_bias"] {
            if raw[key].as_bool() == Some(true) {
                return Err(invalid(format!("`{key}` true is not supported")));
            }
        }
        // transformers 5 nests the rotary settings in `rope_parameters`; 4.x keeps them flat.
        let rope = &raw["rope_parameters"];
        let scaling = match &raw["rope_scaling"] {
            serde_json::Value::Null => rope["rope_type"].as_str().unwrap_or("default"),
            s => s["rope_type"]
                .as_str()
                .or(s["type"].as_str())
                .unwrap_or("?"),
        };
        if scaling != "default" {
            return Err(invalid(format!(
                "rope scaling `{scaling}` is not supported (only unscaled rotary embeddings)"
            )));
        }
        let float = |v: &serde_json::Value, key: &str, default: f64| -> Result<f64> {
            match v {
                serde_json::Value::Null => Ok(default),
                v => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| invalid(format!("`{key}` is {v}, not a positive number"))),
            }
        };
        let rope_theta = match &raw["rope_theta"] {
            serde_json::Value::Null => float(&rope["rope_theta"], "rope_theta", 10000.0)?,
            v => float(v, "rope_theta", 10000.0)?,
        };
        let vocab_size = required("vocab_size")?;
        let token_id = |key: &str| -> Result<Option<u32>> {
            match &raw[key] {
                serde_json::Value::Null => Ok(None),
                v => match v.as_u64() {
                    Some(id) if (id as usize) < vocab_size => Ok(Some(id as u32)),
                    _ => Err(invalid(format!(
                        "`{key}` is {v}, not a token id below vocab_size {vocab_size}"
                    ))),
                },
            }
        };
        Ok(LlamaConfig {
            num_hidden_layers: required("num_hidden_layers")?,
            hidden_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: required("intermediate_size")?,
            vocab_size,
            max_position_embeddings: required("max_position_embeddings")?,
            rope_theta,
            rms_norm_eps: float(&raw["rms_norm_eps"], "rms_norm_eps", 1e-6)?,
            tie_word_embeddings: raw["tie_word_embeddings"].as_bool().unwrap_or(false),
            bos_token_id: token_id("bos_token_id")?,
            eos_token_id: token_id("eos_token_id")?,
            pad_token_id: token_id("pad_token_id")?,
        })
    }

    /// Rows of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The Hugging Face `config.json` of a `LlamaForCausalLM` with this shape (f32 weights).
    pub fn to_hf_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": true,
        })
    }
}
