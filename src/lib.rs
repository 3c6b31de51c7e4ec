//! scalpel: a from-scratch tensor engine for model surgery.
//!
//! The library is the stack of crates below, re-exported so one dependency brings it all:
//! [`tensor`] (tensors, kernels, safetensors) → [`autograd`] (fused differentiable ops, AdamW)
//! → [`models`] (BERT, tokenizer, sentence pooling) → [`surgery`] (score, cut, heal, evaluate).
//! The `scalpel` binary (`src/main.rs`) is a thin command-line layer over them.

#![warn(missing_docs)]

pub mod bench;
pub mod embedder;
pub mod serve;

pub use embedder::{Embedder, EmbedderBuilder};

pub use scalpel_autograd as autograd;
#[cfg(feature = "cuda")]
pub use scalpel_cuda as cuda;
pub use scalpel_models as models;
pub use scalpel_surgery as surgery;
pub use scalpel_tensor as tensor;
