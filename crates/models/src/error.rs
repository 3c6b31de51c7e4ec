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

/// The largest JSON file (configs, `tokenizer.json`, a checkpoint's `trainer_state.json`) read:
/// the largest `tokenizer.json` in common use (Gemma 3's) is 33 MB. The size is checked before
/// anything is read, so a huge or endless file is refused rather than loaded.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// The bytes of `path`, refused (naming the file and both sizes) when there are more than
/// `limit`; the read itself is bounded too, for files whose size the metadata does not tell
/// (pipes, `/proc`).
pub fn read_limited(path: &std::path::Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let io = |source| ModelError::Io {
        path: path.to_owned(),
        source,
    };
    let too_big = |len: u64| {
        ModelError::Input(format!(
            "{}: {len} bytes is over the {limit}-byte limit for this file",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > limit {
        return Err(too_big(len));
    }
    // Sized from the metadata (one byte more to see the end without growing): a growing
    // buffer reached twice the file, which the fuzzer saw as the largest allocation.
    let mut bytes = Vec::with_capacity(len as usize + 1);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = read_limited(path, MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Json {
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
        // A model trained on a device is checked where it is written from: the host.
        let host;
        let tensor = if tensor.is_host() {
            tensor
        } else {
            host = tensor.to_host()?;
            &host
        };
        let count = match tensor.dtype() {
            dtype if !dtype.is_float() => 0,
            DType::F32 => tensor
                .values::<f32>()?
                .iter()
                .filter(|x| !x.is_finite())
                .count(),
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
