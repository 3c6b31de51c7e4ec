use thiserror::Error;

#[derive(Debug, Error)]
pub enum CudaError {
    /// A kernel launch the emulator rejected or a fault it detected while running one (divergent
    /// barrier, deadlock, shuffle from an inactive lane).
    #[error("emulator: {0}")]
    Emulator(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// Something the requested backend needs is not on this machine.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("no kernel named `{0}` in kernels/*.cu")]
    UnknownKernel(String),
    #[error("shape: {0}")]
    Shape(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}
