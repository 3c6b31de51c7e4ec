//! GELU in the exact erf form BERT uses: `gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2))`.

use std::mem::MaybeUninit;

use crate::cpu::gemm_bf16::round_on_this_thread;
use crate::cpu::simd::{dispatch, exp, normal_cdf, store_each_uninit, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut, as_f32_uninit, task_len};
use crate::{threads, Float};

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/√(2π), the standard normal density's constant.
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `x ← gelu(x)`. In place, so that inference can overwrite the linear layer's output instead of
/// holding a second activation-sized buffer.
pub fn gelu_forward_reference<F: Float>(x: &mut [F]) {
    let (half, c) = (F::from_f64(0.5), F::from_f64(FRAC_1_SQRT_2));
    for x in x.iter_mut() {
        *x = half * *x * (F::ONE + (*x * c).erf());
    }
}

/// `dx = dy · (Φ(x) + x·φ(x))`.
pub fn gelu_backward_reference<F: Float>(x: &[F], dy: &[F], dx: &mut [F]) {
    let (half, c, d) = (
        F::from_f64(0.5),
        F::from_f64(FRAC_1_SQRT_2),
        F::from_f64(FRAC_1_SQRT_2PI),
    );
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        let cdf = half * (F::ONE + (x * c).erf());
        let pdf = d * (-half * x * x).exp();
        *dx = dy * (cdf + x * pdf);
    }
}

/// `x ← gelu(x)`.
pub fn gelu_forward<F: Float>(x: &mut [F]) {
    match as_f32_mut(x) {
        Some(x) => gelu_forward_with_isa(Isa::best(), x),
        None => gelu_forward_reference(x),
    }
}

/// `y = gelu(x)` into `y`, which need not be initialised: training keeps `x` (the backward
/// reads it), and writing a fresh buffer once beats copying `x` and overwriting the copy (that
/// copy was 6% of a bf16 train step, memmove and page faults).
pub fn gelu_forward_into<F: Float>(x: &[F], y: &mut [MaybeUninit<F>]) {
    assert_eq!(x.len(), y.len(), "gelu: lengths differ");
    if let (Some(x), Some(y)) = (as_f32(x), as_f32_uninit(y)) {
        return gelu_forward_into_with_isa(Isa::best(), x, y);
    }
    let mut values = x.to_vec();
    gelu_forward_reference(&mut values);
    for (y, v) in y.iter_mut().zip(values) {
        y.write(v);
    }
}

/// `dx = dy · gelu'(x)` into `dx`, which need not be initialised (every element is written:
/// zeroing it first was a memset of the FFN's widest activation in every layer's backward).
pub fn gelu_backward<F: Float>(x: &[F], dy: &[F], dx: &mut [MaybeUninit<F>]) {
    if let (Some(x), Some(dy), Some(dx)) = (as_f32(x), as_f32(dy), as_f32_uninit(dx)) {
        return gelu_backward_with_isa(Isa::best(), x, dy, dx);
    }
    let mut values = vec![F::ZERO; x.len()];
    gelu_backward_reference(x, dy, &mut values);
    for (dx, v) in dx.iter_mut().zip(values) {
        dx.write(v);
    }
}

/// Elements per task below which GELU is not worth splitting (≈ 20 µs of work).
const GELU_MIN_PER_TASK: usize = 1 << 13;

pub fn gelu_forward_with_isa(isa: Isa, x: &mut [f32]) {
    let chunk = task_len(x.len(), GELU_MIN_PER_TASK);
    threads::parallel_each(x.chunks_mut(chunk).collect(), |x| {
        dispatch!(isa, |s, x: &mut [f32]| -> () { gelu_forward_body(s, x) })
    });
}

pub fn gelu_forward_into_with_isa(isa: Isa, x: &[f32], y: &mut [MaybeUninit<f32>]) {
    assert_eq!(x.len(), y.len(), "gelu: lengths differ");
    let chunk = task_len(x.len(), GELU_MIN_PER_TASK);
    let items: Vec<_> = x.chunks(chunk).zip(y.chunks_mut(chunk)).collect();
    threads::parallel_each(items, |(x, y)| {
        dispatch!(isa, |s, x: &[f32], y: &mut [MaybeUninit<f32>]| -> () {
            store_each_uninit(s, y, |i| gelu_lanes(s, s.load_or(&x[i..], 0.0)))
        })
    });
}

/// Values per block of [`gelu_forward_into_bf16`]'s f32 scratch (4 KiB on the stack, in L1).
const GELU_BF16_BLOCK: usize = 1024;

/// `y = gelu(x)` rounded to bf16 as [`crate::cpu::gemm_bf16::round_into`] rounds: the input of
/// a bf16 GEMM (bf16 training's FFN), stored in half the bytes and read by the GEMM's forward
/// and its weight gradient as it is, with the bits their own rounding of the f32 GELU would
/// give. Each block is computed in f32 into scratch and rounded from there.
pub fn gelu_forward_into_bf16(x: &[f32], y: &mut [MaybeUninit<half::bf16>]) {
    assert_eq!(x.len(), y.len(), "gelu: lengths differ");
    let isa = Isa::best();
    let chunk = task_len(x.len(), GELU_MIN_PER_TASK);
    let items: Vec<_> = x.chunks(chunk).zip(y.chunks_mut(chunk)).collect();
    threads::parallel_each(items, |(x, y)| {
        let mut block = [MaybeUninit::<f32>::uninit(); GELU_BF16_BLOCK];
        for (x, y) in x.chunks(GELU_BF16_BLOCK).zip(y.chunks_mut(GELU_BF16_BLOCK)) {
            let f = &mut block[..x.len()];
            dispatch!(isa, |s, x: &[f32], f: &mut [MaybeUninit<f32>]| -> () {
                store_each_uninit(s, f, |i| gelu_lanes(s, s.load_or(&x[i..], 0.0)))
            });
            // SAFETY: `store_each_uninit` initialised every element of `f`.
            let f = unsafe { &*(f as *const [MaybeUninit<f32>] as *const [f32]) };
            round_on_this_thread(f, y);
        }
    });
}

pub fn gelu_backward_with_isa(isa: Isa, x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    assert!(
        x.len() == dy.len() && x.len() == dx.len(),
        "gelu_backward: lengths differ"
    );
    let chunk = task_len(x.len(), GELU_MIN_PER_TASK);
    let items: Vec<_> = x
        .chunks(chunk)
        .zip(dy.chunks(chunk))
        .zip(dx.chunks_mut(chunk))
        .collect();
    threads::parallel_each(items, |((x, dy), dx)| {
        dispatch!(isa, |s,
                        x: &[f32],
                        dy: &[f32],
                        dx: &mut [MaybeUninit<f32>]|
         -> () { gelu_backward_body(s, x, dy, dx) })
    });
}

#[inline(always)]
fn gelu_lanes<S: Simd>(s: S, v: S::V) -> S::V {
    s.mul(v, normal_cdf(s, v))
}

#[inline(always)]
fn gelu_forward_body<S: Simd>(s: S, x: &mut [f32]) {
    for i in (0..x.len()).step_by(S::LANES) {
        let v = s.load_or(&x[i..], 0.0);
        s.store_or(&mut x[i..], gelu_lanes(s, v));
    }
}

#[inline(always)]
fn gelu_backward_body<S: Simd>(s: S, x: &[f32], dy: &[f32], dx: &mut [MaybeUninit<f32>]) {
    let (minus_half, pdf_scale) = (s.splat(-0.5), s.splat(FRAC_1_SQRT_2PI as f32));
    store_each_uninit(s, dx, |i| {
        let xv = s.load_or(&x[i..], 0.0);
        let pdf = s.mul(pdf_scale, exp(s, s.mul(minus_half, s.mul(xv, xv))));
        let grad = s.mul_add(xv, pdf, normal_cdf(s, xv));
        s.mul(s.load_or(&dy[i..], 0.0), grad)
    })
}
