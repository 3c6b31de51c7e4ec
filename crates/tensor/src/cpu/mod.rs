//! Hand-written CPU kernels, one file per kernel family.
//!
//! Every family exposes generic entry points over [`Float`](crate::Float). `f64` always runs the
//! plain scalar `reference` code (it exists for gradient checks and as the oracle the fast path is
//! tested against); `f32` is routed to the fast path (SIMD and threads) where one exists.
//! All slices are contiguous row-major; shapes are passed explicitly and checked by `ops`.

pub mod activation;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod pooling;
pub mod softmax;

use crate::{DType, Float};

/// Views a generic slice as `f32` when that is what it holds: the hook by which generic entry
/// points select the fast `f32` kernels at monomorphisation time, at no run-time cost.
pub(crate) fn as_f32<F: Float>(x: &[F]) -> Option<&[f32]> {
    (F::DTYPE == DType::F32).then(|| bytemuck::cast_slice(x))
}

pub(crate) fn as_f32_mut<F: Float>(x: &mut [F]) -> Option<&mut [f32]> {
    (F::DTYPE == DType::F32).then(|| bytemuck::cast_slice_mut(x))
}
