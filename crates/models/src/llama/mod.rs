//! Llama-family decoders (SmolLM2, ...) read from llama.cpp's GGUF files: the config from the
//! `llama.*` metadata ([`config`]), the weights under their Hugging Face names with the query/key
//! rows un-permuted ([`weights`]), and the tokenizer from the `tokenizer.ggml.*` metadata
//! ([`tokenizer`]). [`LlamaCheckpoint::write_hf_files`] writes them as a Hugging Face folder,
//! which [`LlamaCheckpoint::load`] also reads. [`model`] runs them (with a KV cache),
//! [`generate`] decodes, [`perplexity`] scores text in sliding windows, [`chat`] renders the
//! checkpoint's chat template.

pub mod chat;
pub mod config;
pub mod generate;
pub mod model;
pub mod perplexity;
pub mod tokenizer;
pub mod weights;

use std::collections::BTreeMap;
use std::path::Path;

use scalpel_tensor::gguf::Gguf;
use scalpel_tensor::{safetensors, Tensor};
use serde_json::json;

pub use config::LlamaConfig;
pub use model::{KvCache, Llama};

use crate::{ModelError, Result};

/// Everything a GGUF file holds for one Llama model, decoded.
pub struct LlamaCheckpoint {
    pub config: LlamaConfig,
    /// Hugging Face names; f32.
    pub weights: BTreeMap<String, Tensor>,
    pub tokenizer: tokenizers::Tokenizer,
    pub tokenizer_config: serde_json::Value,
}

impl LlamaCheckpoint {
    pub fn from_gguf(path: &Path) -> Result<LlamaCheckpoint> {
        let gguf = Gguf::open(path)?;
        let config = LlamaConfig::from_gguf(&gguf)?;
        let tokenizer = tokenizer::tokenizer_from_gguf(&gguf)?;
        let tokens = tokenizer.get_vocab_size(true);
        if tokens != config.vocab_size {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                detail: format!(
                    "tokenizer.ggml.tokens has {tokens} tokens but llama.vocab_size is {}",
                    config.vocab_size
                ),
            });
        }
        let weights = weights::load_weights(&gguf, &config)?;
        let tokenizer_config = tokenizer::tokenizer_config_json(&gguf, &config)?;
        Ok(LlamaCheckpoint {
            config,
            weights,
            tokenizer,
            tokenizer_config,
        })
    }

    /// A GGUF file, or a Hugging Face `LlamaForCausalLM` folder (`config.json`,
    /// `model.safetensors`, `tokenizer.json`, and `tokenizer_config.json` if present: what
    /// [`LlamaCheckpoint::write_hf_files`] writes).
    pub fn load(path: &Path) -> Result<LlamaCheckpoint> {
        if !path.is_dir() {
            return LlamaCheckpoint::from_gguf(path);
        }
        let config_path = path.join("config.json");
        let raw: serde_json::Value = crate::error::read_json(&config_path)?;
        let config = LlamaConfig::from_hf_json(&raw, &config_path)?;
        let weights_path = path.join("model.safetensors");
        if !weights_path.exists() {
            return Err(ModelError::Input(format!(
                "{}: not found (scalpel reads a Llama folder's weights from model.safetensors)",
                weights_path.display()
            )));
        }
        let weights = safetensors::load(&weights_path)?.tensors;
        let tokenizer_path = path.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
            ModelError::Tokenizer {
                path: tokenizer_path.clone(),
                detail: e.to_string(),
            }
        })?;
        let tokenizer_config_path = path.join("tokenizer_config.json");
        let tokenizer_config = if tokenizer_config_path.exists() {
            crate::error::read_json(&tokenizer_config_path)?
        } else {
            json!({})
        };
        Ok(LlamaCheckpoint {
            config,
            weights,
            tokenizer,
            tokenizer_config,
        })
    }

    /// The model, its weights checked against the config (moved out of the checkpoint).
    pub fn model(&mut self, path: &Path) -> Result<Llama> {
        Llama::new(self.config.clone(), std::mem::take(&mut self.weights), path)
    }

    /// The Jinja chat template of the tokenizer config, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.tokenizer_config["chat_template"].as_str()
    }

    /// Writes `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json` into `dir` (an existing, empty folder: the caller stages it).
    pub fn write_hf_files(&self, dir: &Path) -> Result<()> {
        let write_json = |name: &str, value: &serde_json::Value| {
            let path = dir.join(name);
            let text = serde_json::to_string_pretty(value).expect("a JSON value serialises");
            std::fs::write(&path, text + "\n").map_err(|source| ModelError::Io { path, source })
        };
        write_json("config.json", &self.config.to_hf_json())?;
        write_json("tokenizer_config.json", &self.tokenizer_config)?;
        write_json(
            "generation_config.json",
            &json!({
                "bos_token_id": self.config.bos_token_id,
                "eos_token_id": self.config.eos_token_id,
                "pad_token_id": self.config.pad_token_id,
            }),
        )?;
        let tokenizer_path = dir.join("tokenizer.json");
        self.tokenizer
            .save(&tokenizer_path, true)
            .map_err(|e| ModelError::Tokenizer {
                path: tokenizer_path.clone(),
                detail: format!("cannot write: {e}"),
            })?;
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::save(&dir.join("model.safetensors"), &self.weights, &metadata)?;
        Ok(())
    }
}
