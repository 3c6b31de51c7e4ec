//! Where the ops run: the CPU kernels of `scalpel-tensor`, or the CUDA kernels of `scalpel-cuda`
//! on a GPU or on the CPU emulator (the same `.cu` sources, one host launch path).
//!
//! An op runs where its inputs are: a tensor's storage knows its device
//! ([`scalpel_tensor::Device`]), host tensors run the CPU kernels and device tensors their
//! backend's ([`backend_of`]); a backward runs where its gradient and saved tensors are. Nothing
//! moves between host and device except by [`Device::place`] / [`Tensor::to_host`] (and the ids
//! and read-back scalars an op needs), so a model or a parameter set moves once.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

#[cfg(feature = "cuda")]
use scalpel_cuda::Runtime;
pub use scalpel_tensor::Device;
use scalpel_tensor::{Backend, Tensor};

use crate::{AutogradError, Result};

/// What a user asks for (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceKind {
    /// CUDA when a usable GPU, driver and NVRTC are present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A GPU through the CUDA driver; an error when anything it needs is missing.
    Cuda,
    /// The CUDA kernels on the CPU emulator (for testing the CUDA path without a GPU; scalar, so slow on big shapes).
    Emu,
}

impl FromStr for DeviceKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceKind::Auto),
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" | "gpu" => Ok(DeviceKind::Cuda),
            "emu" | "emulator" => Ok(DeviceKind::Emu),
            _ => Err(format!(
                "unknown device `{s}` (expected auto, cpu, cuda or emu)"
            )),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Auto => "auto",
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Emu => "emu",
        })
    }
}

/// The CUDA kernels on the CPU emulator. Always available.
#[cfg(feature = "cuda")]
pub fn emulator() -> Device {
    Device::Accelerator(Arc::new(Runtime::emulator()))
}

/// GPU `ordinal`; the error names every missing piece (driver library, NVRTC, headers, GPU).
#[cfg(feature = "cuda")]
pub fn cuda(ordinal: usize) -> Result<Device> {
    scalpel_cuda::gpu_runtime(ordinal)
        .map(|rt| Device::Accelerator(Arc::new(rt)))
        .map_err(|missing| {
            AutogradError::Device(format!(
                "CUDA is not usable on this machine: {}",
                missing.join("; ")
            ))
        })
}

/// Resolves `kind`. Returns the device and, for `auto` falling back to the CPU, why (for
/// example `no CUDA: CUDA driver library ...`).
#[cfg(feature = "cuda")]
pub fn resolve(kind: DeviceKind) -> Result<(Device, Option<String>)> {
    match kind {
        DeviceKind::Cpu => Ok((Device::Cpu, None)),
        DeviceKind::Emu => Ok((emulator(), None)),
        DeviceKind::Cuda => Ok((cuda(0)?, None)),
        DeviceKind::Auto => match scalpel_cuda::gpu_runtime(0) {
            Ok(rt) => Ok((Device::Accelerator(Arc::new(rt)), None)),
            Err(missing) => Ok((
                Device::Cpu,
                Some(format!("no CUDA: {}", missing.join("; "))),
            )),
        },
    }
}

/// [`resolve`] in a build without the `cuda` feature: the CPU, and an error for the CUDA kinds.
#[cfg(not(feature = "cuda"))]
pub fn resolve(kind: DeviceKind) -> Result<(Device, Option<String>)> {
    match kind {
        DeviceKind::Cpu => Ok((Device::Cpu, None)),
        DeviceKind::Auto => Ok((Device::Cpu, Some("built without the `cuda` feature".into()))),
        DeviceKind::Cuda | DeviceKind::Emu => Err(AutogradError::Device(format!(
            "--device {kind}: this build has no CUDA backend (rebuild with the default `cuda` feature)"
        ))),
    }
}

/// The device backend `op` runs on: `None` when every tensor is on the host (the CPU kernels),
/// the backend when all are on one device; an error naming both devices when they are mixed.
pub fn backend_of(op: &str, tensors: &[&Tensor]) -> Result<Option<Arc<dyn Backend>>> {
    let mut found: Option<(usize, Arc<dyn Backend>)> = None;
    let mut host = None;
    for (i, t) in tensors.iter().enumerate() {
        match t.device() {
            Device::Cpu => host = host.or(Some(i)),
            Device::Accelerator(b) => match &found {
                Some((_, first)) if first.id() != b.id() => {
                    return Err(mixed(op, &first.name(), &b.name()))
                }
                Some(_) => {}
                None => found = Some((i, b)),
            },
        }
    }
    match (found, host) {
        (Some((i, b)), Some(h)) => Err(AutogradError::Device(format!(
            "{op}: input {i} is on {} but input {h} is on the cpu (move both with to_device)",
            b.name()
        ))),
        (found, _) => Ok(found.map(|(_, b)| b)),
    }
}

fn mixed(op: &str, a: &str, b: &str) -> AutogradError {
    AutogradError::Device(format!("{op}: inputs on two devices, {a} and {b}"))
}
