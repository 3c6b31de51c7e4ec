//! The CUDA crate's tests: one module per subject, all in one test binary (one link, not one per file).

mod emulator_kernels;
mod nvrtc;
mod planted;
mod probe;
mod report;
