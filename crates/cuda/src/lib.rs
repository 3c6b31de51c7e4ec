//! `scalpel-cuda`: scalpel's CUDA backend.
//!
//! The kernels are plain CUDA C++ in the workspace's `kernels/` folder, one file per family.
//! They run two ways behind one host code path ([`Runtime`]):
//!
//! * on a GPU through the CUDA driver, compiled at run time by NVRTC ([`nvrtc`]) with the PTX
//!   cached on disk;
//! * on the CPU through the emulator ([`Runtime::emulator`]): the same sources compiled as host
//!   C++ against a small shim (`emu/shim.h`), so every kernel is tested on machines without a GPU.
//!
//! [`kernels`] holds, per kernel file, the host-side operations (shape checks, grid sizes,
//! launches through launchers build.rs generates from the `.cu` signatures) and the checks
//! against the CPU references of `scalpel-tensor` ([`check`] runs them all); [`report`]
//! gathers compile results, register and spill counts and those comparisons into the
//! `scalpel kernels` report.

#[cfg(not(target_endian = "little"))]
compile_error!("kernel argument marshalling assumes a little-endian host");

pub mod bench;
pub mod check;
pub mod cublas;
mod driver;
mod emulator;
mod error;
pub mod kernels;
pub mod nvrtc;
mod probe;
pub mod report;
mod runtime;
mod sources;
pub mod tensors;
mod toolkit;

pub use error::{CudaError, Result};
pub use probe::{gpu_runtime, probe, Probe};
pub use runtime::{
    DeviceBuffer, DeviceElement, DeviceIn, DeviceOut, KernelArg, LaunchConfig, Runtime,
};
pub use sources::{kernel_files, kernel_headers, KernelFile, KernelHeader};
pub use toolkit::Toolkit;
