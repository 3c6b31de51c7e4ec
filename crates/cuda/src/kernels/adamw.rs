//! `kernels/adamw.cu`: the fused Adam/AdamW update; and its check.

use super::{expect_len, grid_stride};
use crate::check::{check, max_rel_error, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{CudaError, DeviceBuffer, Result, Runtime};

launchers!("adamw");

/// How an Adam step applies weight decay (crates/autograd/src/optim.rs `Decay`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDecay {
    /// AdamW: `p *= 1 − lr·wd` before the update.
    Decoupled,
    /// Adam with L2: `g += wd·p`.
    L2,
}

/// The hyper-parameters of one Adam step; `step` is 1-based.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay: WeightDecay,
    pub step: u32,
}

/// One fused Adam/AdamW step over flat buffers, exactly as optim.rs's `update`: updates `params`
/// and the moments `m`, `v` in place from `grads`.
pub fn adam_step(
    rt: &Runtime,
    c: &AdamStep,
    params: &mut DeviceBuffer<f32>,
    grads: &DeviceBuffer<f32>,
    m: &mut DeviceBuffer<f32>,
    v: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let n = params.len();
    expect_len(rt, "params", params, n)?;
    expect_len(rt, "grads", grads, n)?;
    expect_len(rt, "m", m, n)?;
    expect_len(rt, "v", v, n)?;
    if c.step == 0 {
        return Err(CudaError::Shape("Adam steps count from 1".into()));
    }
    let t = c.step as i32;
    let decoupled = c.decay == WeightDecay::Decoupled;
    let f = |x: f64| x as f32;
    // SAFETY: lengths checked.
    unsafe {
        launch::adamw_step_f32(
            rt,
            grid_stride(n),
            n,
            f(c.lr / (1.0 - c.beta1.powi(t))),
            f((1.0 - c.beta2.powi(t)).sqrt()),
            f(c.beta1),
            f(c.beta2),
            f(1.0 - c.beta1),
            f(1.0 - c.beta2),
            f(c.eps),
            f(if decoupled {
                1.0 - c.lr * c.weight_decay
            } else {
                1.0
            }),
            f(if decoupled { 0.0 } else { c.weight_decay }),
            params.output(),
            grads.input(),
            m.output(),
            v.output(),
        )
    }
}

/// optim.rs's `update` in f64: the scalars as it computes them, the same operation order.
fn adam_reference(c: &AdamStep, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
    let (b1, b2, t) = (c.beta1, c.beta2, c.step as i32);
    let step_size = c.lr / (1.0 - b1.powi(t));
    let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
    let decoupled = c.decay == WeightDecay::Decoupled;
    let l2 = if decoupled { 0.0 } else { c.weight_decay };
    for i in 0..p.len() {
        let gi = g[i] + l2 * p[i];
        if decoupled && c.weight_decay != 0.0 {
            p[i] *= 1.0 - c.lr * c.weight_decay;
        }
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + c.eps);
    }
}

/// Three Adam steps (bias corrections at t = 1, 2, 3) with decoupled decay and with L2 decay.
/// The parameters are compared as the change `p − p₀`, so an error in the update is not hidden
/// by the parameter's own size.
pub fn check_adam(rt: &Runtime, n: usize) -> Result<Vec<KernelCheck>> {
    let mut rng = Inputs::new(13);
    let p0 = rng.uniform(n, -1.0, 1.0);
    let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.uniform(n, -0.5, 0.5)).collect();
    let mut errors = Vec::new();
    for decay in [WeightDecay::Decoupled, WeightDecay::L2] {
        let (mut p, mut m, mut v) = (rt.upload(&p0)?, rt.zeros(n)?, rt.zeros(n)?);
        let (mut want_p, mut want_m, mut want_v) = (wide(&p0), vec![0.0; n], vec![0.0; n]);
        for (t, g) in grads.iter().enumerate() {
            let c = AdamStep {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
                decay,
                step: t as u32 + 1,
            };
            adam_step(rt, &c, &mut p, &rt.upload(g)?, &mut m, &mut v)?;
            adam_reference(&c, &mut want_p, &wide(g), &mut want_m, &mut want_v);
        }
        let change: Vec<f64> = want_p.iter().zip(&p0).map(|(w, &x)| w - x as f64).collect();
        let got_change: Vec<f32> = p.to_host()?.iter().zip(&p0).map(|(g, x)| g - x).collect();
        errors.push(max_rel_error(&got_change, &change));
        errors.push(max_rel_error(&m.to_host()?, &want_m));
        errors.push(max_rel_error(&v.to_host()?, &want_v));
    }
    Ok(vec![check(
        "adamw_step_f32",
        format!("n={n}, 3 steps, decoupled and L2 decay"),
        worst(&errors),
        F32_TOLERANCE,
    )])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    check_adam(rt, 1037)
}
