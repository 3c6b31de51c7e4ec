//! The workspace-level tests, one module per subject, built as a single test binary: each file
//! under `tests/` would otherwise be its own crate linked against the whole workspace (about
//! 40 MB apiece), and those links dominated the test build.
//!
//! Run one subject with `cargo test --release --test scalpel_tests minilm::`.

mod common;

mod bad_input;
mod bert_grads;
mod bf16_inference;
mod decoder_cut;
mod decoder_heal;
mod decoder_replace;
#[cfg(feature = "cuda")]
mod device;
mod gguf;
mod heal_batches;
mod heal_bf16;
mod heal_parity;
mod heal_resume;
#[cfg(feature = "cuda")]
mod llama_device;
mod llama_gguf;
mod llama_model;
mod minilm;
mod new_head;
mod sequential;
mod serve;
mod surgery_scores;
