//! The tensor crate's tests: one module per subject, all in one test binary (one link, not one per file).

mod accumulate;
mod bf16_gemm;
mod concat;
mod decoder_kernels;
mod dtype;
mod heap;
mod kernels;
mod mapped;
mod packed;
mod safetensors_files;
