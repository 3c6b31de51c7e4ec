//! Hand-written CPU kernels, one file per kernel family.
//!
//! Every family exposes generic entry points over [`Float`](crate::Float). `f64` always runs the
//! plain scalar `reference` code (it exists for gradient checks and as the oracle the fast path is
//! tested against); `f32` is routed to the fast path (SIMD and threads) where one exists.
//! All slices are contiguous row-major; shapes are passed explicitly and checked by `ops`.

pub mod activation;
pub mod attention;
pub mod causal_attention;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod gemm_bf16;
pub mod gemm_weights;
pub mod layernorm;
pub mod pooling;
pub mod rmsnorm;
pub mod rope;
pub mod simd;
pub mod softmax;
pub mod swiglu;

use crate::{DType, Float};

/// Views a generic slice as `f32` when that is what it holds: the hook by which generic entry
/// points select the fast `f32` kernels at monomorphisation time, at no run-time cost.
pub(crate) fn as_f32<F: Float>(x: &[F]) -> Option<&[f32]> {
    (F::DTYPE == DType::F32).then(|| bytemuck::cast_slice(x))
}

pub(crate) fn as_f32_mut<F: Float>(x: &mut [F]) -> Option<&mut [f32]> {
    (F::DTYPE == DType::F32).then(|| bytemuck::cast_slice_mut(x))
}

/// [`as_f32_mut`] for an output that need not be initialised.
pub(crate) fn as_f32_uninit<F: Float>(
    x: &mut [std::mem::MaybeUninit<F>],
) -> Option<&mut [std::mem::MaybeUninit<f32>]> {
    (F::DTYPE == DType::F32 && size_of::<F>() == size_of::<f32>()).then(|| {
        // SAFETY: `F` is `f32` (the only Float whose DTYPE is F32), so the slices have one layout.
        unsafe { &mut *(x as *mut [std::mem::MaybeUninit<F>] as *mut [std::mem::MaybeUninit<f32>]) }
    })
}

/// How many of `len` items to give each parallel task: everything in one task when there is
/// too little work (fewer than two tasks of `min_per_task`) or one thread, otherwise up to four
/// tasks per thread so that uneven progress evens out. Multiples of 16 keep vector loops whole.
pub(crate) fn task_len(len: usize, min_per_task: usize) -> usize {
    let threads = crate::threads::num_threads();
    if threads <= 1 || len < 2 * min_per_task.max(1) {
        return len.max(1);
    }
    let tasks = (len / min_per_task.max(1)).clamp(2, threads * 4);
    len.div_ceil(tasks).next_multiple_of(16)
}
