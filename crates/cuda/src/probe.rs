//! What this machine offers the CUDA backend, found without ever panicking.

use serde::Serialize;

use crate::{CudaError, Runtime, Toolkit};

#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    /// `libcuda.so` could be loaded.
    pub driver_library: bool,
    /// The first GPU's name and architecture, when a context could be created on it.
    pub gpu: Option<String>,
    /// NVRTC's version, when the library could be loaded.
    pub nvrtc: Option<(i32, i32)>,
    pub toolkit: Toolkit,
    /// One line per missing piece, saying what it stops and how to get it.
    pub missing: Vec<String>,
}

impl Probe {
    /// Kernels can run on a GPU.
    pub fn gpu_ready(&self) -> bool {
        self.gpu.is_some()
    }
}

/// GPU `ordinal`, ready to run the kernels, or one line per missing piece (driver library,
/// NVRTC, the headers NVRTC needs, the GPU itself). Checks everything before giving up, so the
/// error names all of what is missing at once. Never panics.
pub fn gpu_runtime(ordinal: usize) -> std::result::Result<Runtime, Vec<String>> {
    let mut missing = Vec::new();
    // SAFETY: only probes for the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        missing.push(
            "CUDA driver library (libcuda.so) not found: no NVIDIA driver on this machine".into(),
        );
    }
    if let Err(e) = crate::nvrtc::version() {
        missing.push(match e {
            CudaError::Unavailable(why) => why,
            e => e.to_string(),
        });
    }
    let headers = Toolkit::discover().missing_headers();
    if !headers.is_empty() {
        missing.push(format!(
            "CUDA headers {headers:?} for NVRTC not found: run `eval \"$(scripts/cuda_wheels.sh)\"`"
        ));
    }
    if !missing.is_empty() {
        return Err(missing);
    }
    Runtime::cuda(ordinal).map_err(|e| vec![format!("GPU {ordinal}: {e}")])
}

pub fn probe() -> Probe {
    let mut missing = Vec::new();
    // SAFETY: only probes for the library.
    let driver_library = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver_library {
        missing.push("CUDA driver library (libcuda.so): no GPU driver on this machine; kernels run on the emulator".into());
    }
    let nvrtc = match crate::nvrtc::version() {
        Ok(v) => Some(v),
        Err(e) => {
            missing.push(e.to_string());
            None
        }
    };
    let toolkit = Toolkit::discover();
    let headers = toolkit.missing_headers();
    if !headers.is_empty() {
        missing.push(format!(
            "CUDA headers {headers:?} for NVRTC: run `eval \"$(scripts/cuda_wheels.sh)\"`"
        ));
    }
    if toolkit.ptxas.is_none() {
        missing
            .push("ptxas (register and spill counts): in the nvidia-cuda-nvcc-cu12 wheel".into());
    }
    let gpu = if driver_library && nvrtc.is_some() {
        match Runtime::cuda(0) {
            Ok(rt) => Some(rt.name()),
            Err(e) => {
                missing.push(format!("GPU: {e}"));
                None
            }
        }
    } else {
        None
    };
    Probe {
        driver_library,
        gpu,
        nvrtc,
        toolkit,
        missing,
    }
}
