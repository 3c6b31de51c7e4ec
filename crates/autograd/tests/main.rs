//! The autograd crate's tests: one module per subject, all in one test binary (one link, not one per file).

mod adam;
mod decoder_ops;
#[cfg(feature = "cuda")]
mod device;
mod gradcheck;
mod linear_bf16;
mod torch_fixtures;
