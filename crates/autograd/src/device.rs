//! Where the ops run: the CPU kernels of `scalpel-tensor`, or the CUDA kernels of `scalpel-cuda`
//! on a GPU or on the CPU emulator (the same `.cu` sources, one host launch path).
//!
//! The device is chosen per thread: [`with_device`] scopes one, otherwise the process default
//! ([`set_device`], the CLI's `--device`) applies. An op records the device it ran on in its
//! backward node, so the backward runs where the forward did whenever `backward()` is called.
//!
//! Tensors stay host-resident: a CUDA op uploads its inputs, launches, and downloads its outputs
//! (device-resident tensors are not implemented yet). Only f32 runs on the kernels; other dtypes
//! (the f64 gradient checks) and ops without a kernel run on the CPU whatever the device.

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;
use std::sync::RwLock;

use scalpel_cuda::{DeviceBuffer, Runtime};
use scalpel_tensor::{DType, Tensor};

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

/// A resolved device. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The CUDA kernels on `Runtime` (a GPU or the emulator).
    Cuda(Runtime),
}

impl Device {
    /// The CUDA kernels on the CPU emulator. Always available.
    pub fn emulator() -> Device {
        Device::Cuda(Runtime::emulator())
    }

    /// GPU `ordinal`; the error names every missing piece (driver library, NVRTC, headers, GPU).
    pub fn cuda(ordinal: usize) -> Result<Device> {
        scalpel_cuda::gpu_runtime(ordinal)
            .map(Device::Cuda)
            .map_err(|missing| {
                AutogradError::Device(format!(
                    "CUDA is not usable on this machine: {}",
                    missing.join("; ")
                ))
            })
    }

    /// Resolves `kind`. Returns the device and one line saying what was picked and, for `auto`
    /// falling back to the CPU, why (for example `cpu (no CUDA: CUDA driver library ...)`).
    pub fn resolve(kind: DeviceKind) -> Result<(Device, String)> {
        match kind {
            DeviceKind::Cpu => Ok((Device::Cpu, "cpu".into())),
            DeviceKind::Emu => {
                let d = Device::emulator();
                let line = d.describe();
                Ok((d, line))
            }
            DeviceKind::Cuda => {
                let d = Device::cuda(0)?;
                let line = d.describe();
                Ok((d, line))
            }
            DeviceKind::Auto => match scalpel_cuda::gpu_runtime(0) {
                Ok(rt) => {
                    let d = Device::Cuda(rt);
                    let line = d.describe();
                    Ok((d, line))
                }
                Err(missing) => Ok((
                    Device::Cpu,
                    format!("cpu (no CUDA: {})", missing.join("; ")),
                )),
            },
        }
    }

    /// `cpu`, `emu (CPU emulator)` or `cuda (NVIDIA H100 ... (sm_90))`.
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(rt) if rt.is_emulator() => format!("emu ({})", rt.name()),
            Device::Cuda(rt) => format!("cuda ({})", rt.name()),
        }
    }

    pub fn runtime(&self) -> Option<&Runtime> {
        match self {
            Device::Cpu => None,
            Device::Cuda(rt) => Some(rt),
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }
}

static DEFAULT: RwLock<Option<Device>> = RwLock::new(None);

thread_local! {
    static SCOPED: RefCell<Option<Device>> = const { RefCell::new(None) };
}

/// Sets the process-wide default device (threads without a [`with_device`] scope use it).
pub fn set_device(device: Device) {
    *DEFAULT.write().unwrap_or_else(|e| e.into_inner()) = Some(device);
}

/// The device ops on this thread run on now: the innermost [`with_device`] scope, else the
/// process default, else the CPU.
pub fn current() -> Device {
    SCOPED
        .with(|s| s.borrow().clone())
        .or_else(|| DEFAULT.read().unwrap_or_else(|e| e.into_inner()).clone())
        .unwrap_or_default()
}

/// Runs `f` with ops on this thread dispatched to `device`, then restores the previous choice
/// (also when `f` panics).
pub fn with_device<R>(device: Device, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Device>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            SCOPED.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = SCOPED.with(|s| s.borrow_mut().replace(device));
    let _restore = Restore(previous);
    f()
}

// ---------------------------------------------------------------------------------------------
// Helpers of the ops' CUDA branches.

/// The runtime to run an op on: the current device's, when it is CUDA and every tensor is f32.
pub(crate) fn runtime_for(tensors: &[&Tensor]) -> Option<Runtime> {
    match current() {
        Device::Cuda(rt) if tensors.iter().all(|t| t.dtype() == DType::F32) => Some(rt),
        _ => None,
    }
}

/// `rt` again for a backward, when the gradient is f32 too.
pub(crate) fn backward_runtime(rt: &Option<Runtime>, grad: &Tensor) -> Option<Runtime> {
    rt.as_ref().filter(|_| grad.dtype() == DType::F32).cloned()
}

pub(crate) fn upload(rt: &Runtime, t: &Tensor) -> Result<DeviceBuffer<f32>> {
    Ok(rt.upload(t.values::<f32>()?)?)
}

pub(crate) fn upload_ids(rt: &Runtime, ids: &[usize]) -> Result<DeviceBuffer<i32>> {
    let ids = ids
        .iter()
        .map(|&i| {
            i32::try_from(i)
                .map_err(|_| AutogradError::Device(format!("index {i} does not fit a 32-bit int")))
        })
        .collect::<Result<Vec<i32>>>()?;
    Ok(rt.upload(&ids)?)
}

pub(crate) fn download(buffer: &DeviceBuffer<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(shape, buffer.to_host()?)?)
}
