use std::path::PathBuf;

/// What can go wrong turning a folder on disk into a runnable model. Each variant names the file,
/// tensor or setting at fault, so a user can fix the input without reading code.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Tensor(#[from] scalpel_tensor::TensorError),
    #[error(transparent)]
    Autograd(#[from] scalpel_autograd::AutogradError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {detail}")]
    Json { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error("{path}: tensor `{name}` is missing (the config needs it)")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, the config implies {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has {count} non-finite values (NaN or infinite) of {total}")]
    NonFinite {
        path: PathBuf,
        name: String,
        count: usize,
        total: usize,
    },
    #[error("tokenizer {path}: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

/// Fails on the first (in name order) float tensor holding NaN or infinite values, naming it and
/// how many: such weights would turn every output into NaN without any other error.
pub fn check_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a String, &'a scalpel_tensor::Tensor)>,
    path: &std::path::Path,
) -> Result<()> {
    use scalpel_tensor::DType;
    for (name, tensor) in tensors {
        let count = match tensor.dtype() {
            DType::F32 => tensor
                .values::<f32>()?
                .iter()
                .filter(|x| !x.is_finite())
                .count(),
            DType::I64 => 0,
            _ => tensor
                .to_vec::<f64>()
                .iter()
                .filter(|x| !x.is_finite())
                .count(),
        };
        if count > 0 {
            return Err(ModelError::NonFinite {
                path: path.to_owned(),
                name: name.clone(),
                count,
                total: tensor.numel(),
            });
        }
    }
    Ok(())
}
