//! `scalpel-surgery`: what the tool is for. Remove encoder layers ([`cut`]), write the result as
//! a checkpoint the ecosystem loads ([`checkpoint`]), and retrain it ([`heal`]) by distilling
//! from the original model with our own AdamW.

pub mod chart;
pub mod checkpoint;
pub mod cut;
pub mod data;
pub mod decoder;
pub mod decoder_heal;
pub mod decoder_replace;
pub mod eval;
pub mod head;
pub mod heal;
pub mod score;
pub mod teacher_targets;

/// Errors of the surgery layer, each naming the input at fault.
#[derive(Debug, thiserror::Error)]
pub enum SurgeryError {
    #[error(transparent)]
    Model(#[from] scalpel_models::ModelError),
    #[error(transparent)]
    Autograd(#[from] scalpel_autograd::AutogradError),
    #[error(transparent)]
    Tensor(#[from] scalpel_tensor::TensorError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = SurgeryError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> SurgeryError + '_ {
    move |source| SurgeryError::Io {
        path: path.to_owned(),
        source,
    }
}
