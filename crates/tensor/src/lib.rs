//! `scalpel-tensor`: the bottom layer of scalpel.
//!
//! * [`Tensor`]: a shape plus contiguous row-major storage in one of a few dtypes.
//! * [`backend`]: where a tensor's storage is (host or a device) and the kernels a device
//!   provides.
//! * [`cpu`]: hand-written CPU kernels, one file per kernel family, each with its plain scalar
//!   reference beside the fast (SIMD, threaded) version.
//! * [`ops`]: tensor-level entry points that check shapes and dispatch on dtype to the kernels;
//!   [`decoder_ops`] the same for the decoder (Llama) ops.
//! * [`safetensors`]: loading and saving named tensors, with errors that name the problem.
//! * [`gguf`]: reading llama.cpp's GGUF files (metadata, tensor infos, dequantization to f32).
//! * [`heap`]: allocator tuning so freed tensor buffers are reused rather than unmapped.

pub mod backend;
pub mod cpu;
pub mod decoder_ops;
mod dtype;
mod error;
mod float;
pub mod gguf;
pub mod heap;
pub mod ops;
pub mod safetensors;
mod tensor;
pub mod threads;

pub use backend::{Backend, Device, DeviceMemory, DeviceStats};
pub use dtype::{DType, Element};
pub use error::{Result, TensorError};
pub use float::Float;
pub use tensor::{Data, Tensor};
