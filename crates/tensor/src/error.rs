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
