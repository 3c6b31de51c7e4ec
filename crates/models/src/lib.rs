//! `scalpel-models`: model families on top of the tensor and autograd crates.
//!
//! * [`bert`]: BERT-family encoders read from a Hugging Face `config.json` + `model.safetensors`.
//! * [`llama`]: Llama-family decoders from GGUF files (config, weights, tokenizer).
//! * [`tokenizer`]: the checkpoint's own `tokenizer.json`, through the `tokenizers` crate.
//! * [`sentence`]: sentence-transformers pooling and the whole text → embedding pipeline,
//!   configured by the checkpoint's `modules.json` and pooling files.

pub mod bert;
mod error;
pub mod llama;
mod precision;
pub mod sentence;
pub mod sequential;
pub mod tokenizer;

pub use error::{check_finite, read_limited, ModelError, Result, MAX_JSON_BYTES};
pub(crate) use precision::set_weights_dtype;
