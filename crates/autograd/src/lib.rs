//! `scalpel-autograd`: reverse-mode differentiation over coarse, fused ops, and the optimiser.
//!
//! A [`Var`] is a tensor plus, when any input of the op that produced it needs a gradient, a
//! [`Node`](var) recording that op's backward and its inputs. Nothing is recorded when no input
//! needs a gradient, so inference over frozen or constant weights builds no graph at all: the same
//! model code serves both paths. [`Var::backward`] walks the recorded graph once in reverse
//! topological order and returns the [`Gradients`] of every leaf that asked for one.
//!
//! Every op in [`ops`] is a whole layer-sized step (linear, attention, layernorm, ...) with a
//! hand-written backward built from the kernels of `scalpel-tensor`, or, when the [`device`] is
//! CUDA (a GPU or the emulator), from the kernels of `scalpel-cuda`.

pub mod device;
pub mod gradcheck;
pub mod ops;
pub mod optim;
mod params;
mod var;

pub use params::Params;
pub use var::{Backward, Gradients, Var};

/// Errors of this layer: a tensor-level failure, or misuse of the graph.
#[derive(Debug, thiserror::Error)]
pub enum AutogradError {
    #[error(transparent)]
    Tensor(#[from] scalpel_tensor::TensorError),
    #[error("{0}")]
    Graph(String),
    #[error("optimiser: {0}")]
    Optim(String),
    /// A requested device that cannot be used.
    #[error("device: {0}")]
    Device(String),
}

pub type Result<T, E = AutogradError> = std::result::Result<T, E>;
