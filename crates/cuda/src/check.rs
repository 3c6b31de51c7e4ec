//! What every kernel family's emulator check shares (each family's checks are in
//! [`crate::kernels`], beside its launchers), and [`all`], which runs them.
//!
//! Inputs are random at sizes that are not multiples of any tile or block size; references are
//! computed in f64 from the same f32 inputs. The error measure is normwise:
//! `max |got − want| / max |want|` over each output (elementwise relative error is meaningless
//! where a sum cancels to near zero).

use serde::Serialize;

use crate::{Result, Runtime};

/// f32 kernels against f64 references.
pub const F32_TOLERANCE: f64 = 1e-5;
/// Tensor-core GEMM with f16/bf16 operands against the f64 reference on the f32 inputs (bf16
/// keeps 8 significant bits, unit roundoff 2^-8 = 3.9e-3 per operand; measured errors at the
/// standard shapes are 3e-4 for f16 and 2.5e-3 for bf16).
pub const HALF_TOLERANCE: f64 = 1e-2;
/// Tensor-core GEMM with f32 operands rounded to TF32 (11 significant bits, unit roundoff
/// 2^-11 = 4.9e-4 per operand) against the f64 reference on the f32 inputs: five unit roundoffs.
pub const TF32_TOLERANCE: f64 = 2.5e-3;

#[derive(Clone, Debug, Serialize)]
pub struct KernelCheck {
    pub kernel: String,
    /// What was run, e.g. the shape.
    pub case: String,
    pub max_rel_error: f64,
    pub tolerance: f64,
}

impl KernelCheck {
    /// False for NaN errors too.
    pub fn passed(&self) -> bool {
        self.max_rel_error <= self.tolerance
    }
}

pub(crate) fn check(kernel: &str, case: String, max_rel_error: f64, tolerance: f64) -> KernelCheck {
    KernelCheck {
        kernel: kernel.to_string(),
        case,
        max_rel_error,
        tolerance,
    }
}

/// `max |got − want| / max |want|`; NaN if any output is NaN, infinite for a length mismatch.
pub fn max_rel_error(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .fold(0.0f64, |m, w| m.max(w.abs()))
        .max(f64::MIN_POSITIVE);
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        let e = (g as f64 - w).abs() / scale;
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    })
}

pub(crate) fn worst(errors: &[f64]) -> f64 {
    errors.iter().fold(0.0, |m: f64, &e| {
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    })
}

/// SplitMix64: reproducible inputs without a dependency.
pub struct Inputs(u64);

impl Inputs {
    pub fn new(seed: u64) -> Self {
        Inputs(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `n` values uniform in `[lo, hi)`.
    pub fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32))
            .collect()
    }

    pub fn below(&mut self, n: usize, bound: usize) -> Vec<usize> {
        (0..n)
            .map(|_| (self.next() % bound as u64) as usize)
            .collect()
    }
}

pub(crate) fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

pub(crate) fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Every family's standard checks for the kernel files `include` accepts (by file name, e.g.
/// `"gemm.cu"`): what the tests and the `scalpel kernels` report run.
pub fn all(rt: &Runtime, include: &dyn Fn(&str) -> bool) -> Result<Vec<KernelCheck>> {
    let mut out = Vec::new();
    for (file, checks) in crate::kernels::FAMILIES {
        if include(file) {
            out.extend(checks(rt)?);
        }
    }
    Ok(out)
}
