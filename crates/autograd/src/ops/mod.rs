//! Differentiable ops, one file per family. Each op runs where its inputs are
//! ([`crate::device::backend_of`]): the CPU kernels of the tensor crate for host tensors, the
//! device backend's kernels for device tensors. It saves what its backward needs (on the same
//! device) and records a node only when an input needs a gradient.

mod activation;
mod attention;
mod causal_attention;
mod elementwise;
mod embedding;
mod linear;
mod loss;
mod norm;
mod pair;
mod pooling;
mod rmsnorm;
mod rope;
mod swiglu;

pub use activation::{dropout, gelu, gelu_in_place};
pub use attention::{attention, attention_bf16};
pub use causal_attention::causal_attention;
pub(crate) use elementwise::accumulate;
pub use elementwise::{add, reshape, scale};
pub use embedding::{embedding, Indices};
pub use linear::{
    linear, linear_bf16, linear_gelu, linear_gelu_bf16_rounded, matmul, round_to_bf16,
};
pub use loss::{cosine_loss, cross_entropy, distill_kl, mse_loss};
pub use norm::{add_layernorm, layernorm};
pub use pair::pair_features;
pub use pooling::{l2_normalize, mean_pool};
pub use rmsnorm::rmsnorm;
pub use rope::rope;
pub use swiglu::swiglu;
