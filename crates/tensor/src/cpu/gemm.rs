//! General matrix multiply: `C = op(A)·op(B) + beta·C`.
//!
//! `A` is logically `m×k` (stored `k×m` when `trans_a`), `B` is logically `k×n` (stored `n×k` when
//! `trans_b`). The transposed variants are what backward passes need: `dX = dY·W` and
//! `dW = dYᵀ·X` for a linear layer `Y = X·Wᵀ`.

use crate::Float;

/// Operand layout of one GEMM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl GemmShape {
    #[inline]
    fn a_index(&self, i: usize, p: usize) -> usize {
        if self.trans_a { p * self.m + i } else { i * self.k + p }
    }

    #[inline]
    fn b_index(&self, p: usize, j: usize) -> usize {
        if self.trans_b { j * self.k + p } else { p * self.n + j }
    }
}

/// Plain triple loop, accumulating in the element type. The oracle for the fast kernels.
pub fn gemm_reference<F: Float>(s: GemmShape, a: &[F], b: &[F], c: &mut [F], beta: F) {
    assert_eq!(a.len(), s.m * s.k, "gemm: A has wrong length");
    assert_eq!(b.len(), s.k * s.n, "gemm: B has wrong length");
    assert_eq!(c.len(), s.m * s.n, "gemm: C has wrong length");
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = F::ZERO;
            for p in 0..s.k {
                acc += a[s.a_index(i, p)] * b[s.b_index(p, j)];
            }
            let out = &mut c[i * s.n + j];
            *out = if beta == F::ZERO { acc } else { beta * *out + acc };
        }
    }
}

/// `C = op(A)·op(B) + beta·C`, dispatching `f32` to the fast kernel.
pub fn gemm<F: Float>(s: GemmShape, a: &[F], b: &[F], c: &mut [F], beta: F) {
    gemm_reference(s, a, b, c, beta)
}

/// `batch` independent GEMMs over consecutive `m×k`, `k×n`, `m×n` blocks.
pub fn gemm_batched<F: Float>(batch: usize, s: GemmShape, a: &[F], b: &[F], c: &mut [F], beta: F) {
    let (sa, sb, sc) = (s.m * s.k, s.k * s.n, s.m * s.n);
    for i in 0..batch {
        gemm(
            s,
            &a[i * sa..(i + 1) * sa],
            &b[i * sb..(i + 1) * sb],
            &mut c[i * sc..(i + 1) * sc],
            beta,
        );
    }
}
