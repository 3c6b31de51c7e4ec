//! Differentiable ops, one file per family. Each op computes its forward with the tensor crate,
//! saves what its backward needs, and records a node only when an input needs a gradient.

mod activation;
mod attention;
mod elementwise;
mod embedding;
mod linear;
mod loss;
mod norm;
mod pooling;

pub use activation::{dropout, gelu};
pub use attention::attention;
pub use elementwise::{add, reshape, scale};
pub use embedding::embedding;
pub use linear::{linear, matmul};
pub use loss::{cosine_loss, cross_entropy, mse_loss};
pub use norm::layernorm;
pub use pooling::{l2_normalize, mean_pool};
