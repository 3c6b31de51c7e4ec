//! `kernels/adamw.cu`: the fused multi-tensor Adam/AdamW update; and its check.

use super::{expect_len, BLOCK};
use crate::check::{check, max_rel_error, wide, worst, Inputs, KernelCheck, F32_TOLERANCE};
use crate::{CudaError, DeviceBuffer, LaunchConfig, Result, Runtime};

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

/// One tensor of a multi-tensor Adam step: its hyper-parameters, the parameter and its moments
/// (updated in place) and its gradient.
pub struct AdamTensor<'a> {
    pub step: AdamStep,
    pub param: &'a mut DeviceBuffer<f32>,
    pub grad: &'a DeviceBuffer<f32>,
    pub m: &'a mut DeviceBuffer<f32>,
    pub v: &'a mut DeviceBuffer<f32>,
}

/// Elements one block updates (adamw.cu's `chunk`): 16 per thread, enough that a block's work
/// outweighs its scheduling, few enough that MiniLM's 23 M parameters still make ~5,600 blocks.
const CHUNK: usize = 16 * BLOCK as usize;

/// One group's scalars as adamw.cu takes them: step size, √(1 − β₂ᵗ), β₁, β₂, 1 − β₁, 1 − β₂, ε,
/// the decoupled decay's keep factor and the L2 coefficient; computed in f64, rounded once.
fn group_scalars(c: &AdamStep) -> [f32; 9] {
    let t = c.step as i32;
    let decoupled = c.decay == WeightDecay::Decoupled;
    [
        c.lr / (1.0 - c.beta1.powi(t)),
        (1.0 - c.beta2.powi(t)).sqrt(),
        c.beta1,
        c.beta2,
        1.0 - c.beta1,
        1.0 - c.beta2,
        c.eps,
        if decoupled {
            1.0 - c.lr * c.weight_decay
        } else {
            1.0
        },
        if decoupled { 0.0 } else { c.weight_decay },
    ]
    .map(|x| x as f32)
}

/// adamw.cu's tables of one group, kept by the caller from step to step in long-lived buffers
/// (so keeping them takes no block a step's work reuses), rewritten in place: the state table only
/// when a parameter or moment is somewhere else than the step before, the gradients' every step.
/// Copies and launches are ordered on the device, so a rewrite waits for the launch before it.
struct GroupTables {
    state_on_host: Vec<u64>,
    state: DeviceBuffer<u64>,
    grads: DeviceBuffer<u64>,
}

/// The tables of every group ([`adam_step`] meets the groups in the same order every step).
#[derive(Default)]
pub struct AdamTables {
    groups: Vec<GroupTables>,
}

/// One fused Adam/AdamW step of every tensor in `tensors`, each exactly as optim.rs's `update`:
/// one launch per group of tensors sharing their scalars. Uploads each gradient's address (8
/// bytes a tensor), and a group's state table when it changed; allocates only when the set of
/// tensors does.
pub fn adam_step(rt: &Runtime, tensors: &mut [AdamTensor], tables: &mut AdamTables) -> Result<()> {
    let mut groups: Vec<([f32; 9], Vec<usize>)> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        expect_len(rt, "grad", t.grad, n)?;
        expect_len(rt, "m", t.m, n)?;
        expect_len(rt, "v", t.v, n)?;
        if t.step.step == 0 {
            return Err(CudaError::Shape("Adam steps count from 1".into()));
        }
        let scalars = group_scalars(&t.step);
        let bits = |g: &[f32; 9]| g.map(f32::to_bits);
        match groups.iter_mut().find(|(g, _)| bits(g) == bits(&scalars)) {
            Some((_, members)) => members.push(i),
            None => groups.push((scalars, vec![i])),
        }
    }
    for (index, (scalars, members)) in groups.iter().enumerate() {
        let count = members.len();
        let mut state = vec![0u64; 5 * count];
        let mut chunks = 0u64;
        for (j, &i) in members.iter().enumerate() {
            let t = &tensors[i];
            state[j] = t.param.address();
            state[count + j] = t.m.address();
            state[2 * count + j] = t.v.address();
            state[3 * count + j] = t.param.len() as u64;
            state[4 * count + j] = chunks;
            chunks += t.param.len().div_ceil(CHUNK) as u64;
        }
        let grads: Vec<u64> = members.iter().map(|&i| tensors[i].grad.address()).collect();
        match tables.groups.get_mut(index) {
            Some(g) if g.grads.len() == count => {
                if g.state_on_host != state {
                    g.state.copy_from_host(&state)?;
                    g.state_on_host = state;
                }
                g.grads.copy_from_host(&grads)?;
            }
            slot => {
                let mut tables_now = GroupTables {
                    state: rt.uninit_long_lived(state.len())?,
                    grads: rt.uninit_long_lived(count)?,
                    state_on_host: Vec::new(),
                };
                tables_now.state.copy_from_host(&state)?;
                tables_now.grads.copy_from_host(&grads)?;
                tables_now.state_on_host = state;
                match slot {
                    Some(g) => *g = tables_now,
                    None => tables.groups.push(tables_now),
                }
            }
        }
        if chunks == 0 {
            continue;
        }
        let group = &tables.groups[index];
        let config = LaunchConfig::linear(
            u32::try_from(chunks)
                .map_err(|_| CudaError::Shape(format!("Adam step over {chunks} blocks")))?,
            BLOCK,
        );
        let [step_size, bc2_sqrt, b1, b2, one_b1, one_b2, eps, keep, l2] = *scalars;
        // SAFETY: every table entry is a live buffer of the length the table gives (checked
        // above), each borrowed for the launch; the blocks cover each tensor's chunks.
        unsafe {
            launch::adamw_step_f32(
                rt,
                config,
                count,
                CHUNK,
                group.state.input(),
                group.grads.input(),
                step_size,
                bc2_sqrt,
                b1,
                b2,
                one_b1,
                one_b2,
                eps,
                keep,
                l2,
            )?;
        }
    }
    Ok(())
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

/// Three Adam steps (bias corrections at t = 1, 2, 3) of tensors of ragged sizes in one launch
/// each, with decoupled decay and with L2 decay, half the tensors without decay (a second group),
/// and one empty tensor. The parameters are compared as the change `p − p₀`, so an error in the
/// update is not hidden by the parameter's own size.
pub fn check_adam(rt: &Runtime, sizes: &[usize]) -> Result<Vec<KernelCheck>> {
    let mut rng = Inputs::new(13);
    let p0: Vec<Vec<f32>> = sizes.iter().map(|&n| rng.uniform(n, -1.0, 1.0)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|_| sizes.iter().map(|&n| rng.uniform(n, -0.5, 0.5)).collect())
        .collect();
    let mut errors = Vec::new();
    for decay in [WeightDecay::Decoupled, WeightDecay::L2] {
        let mut p = p0
            .iter()
            .map(|x| rt.upload(x))
            .collect::<Result<Vec<_>>>()?;
        let mut m = sizes
            .iter()
            .map(|&n| rt.zeros(n))
            .collect::<Result<Vec<_>>>()?;
        let mut v = sizes
            .iter()
            .map(|&n| rt.zeros(n))
            .collect::<Result<Vec<_>>>()?;
        let mut want_p: Vec<Vec<f64>> = p0.iter().map(|x| wide(x)).collect();
        let mut want_m: Vec<Vec<f64>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut want_v = want_m.clone();
        let mut table = AdamTables::default();
        for (t, g) in grads.iter().enumerate() {
            let c = |i: usize| AdamStep {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: if i.is_multiple_of(2) { 0.1 } else { 0.0 },
                decay,
                step: t as u32 + 1,
            };
            let g_dev = g.iter().map(|x| rt.upload(x)).collect::<Result<Vec<_>>>()?;
            let mut tensors: Vec<AdamTensor> = p
                .iter_mut()
                .zip(&g_dev)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .enumerate()
                .map(|(i, ((param, grad), (m, v)))| AdamTensor {
                    step: c(i),
                    param,
                    grad,
                    m,
                    v,
                })
                .collect();
            adam_step(rt, &mut tensors, &mut table)?;
            for i in 0..sizes.len() {
                adam_reference(
                    &c(i),
                    &mut want_p[i],
                    &wide(&g[i]),
                    &mut want_m[i],
                    &mut want_v[i],
                );
            }
        }
        for i in 0..sizes.len() {
            let change: Vec<f64> = want_p[i]
                .iter()
                .zip(&p0[i])
                .map(|(w, &x)| w - x as f64)
                .collect();
            let got: Vec<f32> = p[i]
                .to_host()?
                .iter()
                .zip(&p0[i])
                .map(|(g, x)| g - x)
                .collect();
            errors.push(max_rel_error(&got, &change));
            errors.push(max_rel_error(&m[i].to_host()?, &want_m[i]));
            errors.push(max_rel_error(&v[i].to_host()?, &want_v[i]));
        }
    }
    Ok(vec![check(
        "adamw_step_f32",
        format!("sizes {sizes:?}, 3 steps, decoupled and L2 decay, two groups"),
        worst(&errors),
        F32_TOLERANCE,
    )])
}

pub fn standard_checks(rt: &Runtime) -> Result<Vec<KernelCheck>> {
    // Across a chunk boundary (4096), within one chunk, a single element and none.
    check_adam(rt, &[5000, 1037, 1, 0, 300])
}
