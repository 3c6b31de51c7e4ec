//! The autograd crate's tests: one module per subject, all in one test binary (one link, not one per file).

mod adam;
#[cfg(feature = "cuda")]
mod device;
mod gradcheck;
mod torch_fixtures;
