use std::path::PathBuf;

/// Everything that can go wrong below the model layer. Every variant names the thing at fault.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op} does not support dtype {dtype:?}")]
    DType {
        op: &'static str,
        dtype: crate::DType,
    },
    /// Host access to a tensor whose elements are on a device.
    #[error("{op} needs a host tensor, but this one is on {device} (copy it with to_host)")]
    OnDevice { op: &'static str, device: String },
    /// A device runtime failure (allocation, copy, launch), or an op the device cannot run.
    #[error("device: {0}")]
    Device(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {detail}")]
    SafeTensors { path: PathBuf, detail: String },
    #[error("{path}: not a valid GGUF file: {detail}")]
    Gguf { path: PathBuf, detail: String },
}

pub type Result<T, E = TensorError> = std::result::Result<T, E>;

impl TensorError {
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        TensorError::Shape {
            op,
            detail: detail.into(),
        }
    }
}
