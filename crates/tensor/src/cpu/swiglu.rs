//! The gated unit of Llama's MLP as one op: `y = silu(gate)·up`, `silu(g) = g·σ(g)`.

use crate::cpu::simd::{dispatch, exp, Isa, Simd};
use crate::cpu::{as_f32, as_f32_mut, task_len};
use crate::{threads, Float};

fn sigmoid<F: Float>(g: F) -> F {
    F::ONE / (F::ONE + (-g).exp())
}

fn check_lengths<F>(gate: &[F], up: &[F], out: &[F]) {
    assert!(
        gate.len() == up.len() && gate.len() == out.len(),
        "swiglu: gate, up and output lengths differ"
    );
}

pub fn swiglu_forward_reference<F: Float>(gate: &[F], up: &[F], y: &mut [F]) {
    check_lengths(gate, up, y);
    for ((y, &g), &u) in y.iter_mut().zip(gate).zip(up) {
        *y = g * sigmoid(g) * u;
    }
}

/// `dgate = dy·up·σ(g)·(1 + g·(1 − σ(g)))`, `dup = dy·silu(g)`; both overwritten.
pub fn swiglu_backward_reference<F: Float>(
    gate: &[F],
    up: &[F],
    dy: &[F],
    dgate: &mut [F],
    dup: &mut [F],
) {
    check_lengths(gate, up, dy);
    check_lengths(dgate, dup, dy);
    for i in 0..gate.len() {
        let (g, s) = (gate[i], sigmoid(gate[i]));
        dgate[i] = dy[i] * up[i] * s * (F::ONE + g * (F::ONE - s));
        dup[i] = dy[i] * g * s;
    }
}

pub fn swiglu_forward<F: Float>(gate: &[F], up: &[F], y: &mut [F]) {
    match (as_f32(gate), as_f32(up), as_f32_mut(y)) {
        (Some(gate), Some(up), Some(y)) => swiglu_forward_with_isa(Isa::best(), gate, up, y),
        _ => swiglu_forward_reference(gate, up, y),
    }
}

/// Elements per task below which the op is not split over threads (as for GELU).
const MIN_PER_TASK: usize = 1 << 13;

pub fn swiglu_forward_with_isa(isa: Isa, gate: &[f32], up: &[f32], y: &mut [f32]) {
    check_lengths(gate, up, y);
    let chunk = task_len(gate.len(), MIN_PER_TASK);
    let items: Vec<_> = gate
        .chunks(chunk)
        .zip(up.chunks(chunk))
        .zip(y.chunks_mut(chunk))
        .collect();
    threads::parallel_each(items, |((gate, up), y)| {
        dispatch!(isa, |s, gate: &[f32], up: &[f32], y: &mut [f32]| -> () {
            forward_body(s, gate, up, y)
        })
    });
}

#[inline(always)]
fn forward_body<S: Simd>(s: S, gate: &[f32], up: &[f32], y: &mut [f32]) {
    let one = s.splat(1.0);
    for i in (0..gate.len()).step_by(S::LANES) {
        let g = s.load_or(&gate[i..], 0.0);
        let silu = s.div(g, s.add(one, exp(s, s.sub(s.zero(), g))));
        s.store_or(&mut y[i..], s.mul(silu, s.load_or(&up[i..], 0.0)));
    }
}
