//! Adam and AdamW with PyTorch's semantics, global-norm gradient clipping, learning-rate
//! schedules, parameter groups and saveable state.
//!
//! Per parameter, at its step `t` (counted from 1):
//! ```text
//! AdamW: p ← p·(1 − lr·wd)            Adam: g ← g + wd·p
//! m ← β₁m + (1−β₁)g      v ← β₂v + (1−β₂)g²
//! p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)      (ε outside the square root)
//! ```
//! Parameters without a gradient this step (unreached or frozen) are skipped entirely and have no
//! state, as in PyTorch.

use std::collections::BTreeMap;
use std::path::Path;

use scalpel_tensor::backend::{AdamParameter, AdamUpdate, OptimizerCache};
use scalpel_tensor::threads::parallel_each;
use scalpel_tensor::{safetensors, DType, Device, Float, Tensor};

use crate::device::backend_of;
use crate::{AutogradError, Gradients, Params, Result};

/// Which weight decay rule applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    /// AdamW: decay the weights directly, decoupled from the gradient statistics.
    Decoupled,
    /// Adam: add `wd·p` to the gradient (L2 regularisation).
    L2,
}

#[derive(Clone, Debug)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay: Decay,
}

impl AdamConfig {
    /// PyTorch's `AdamW` defaults with the given weight decay.
    pub fn adamw(weight_decay: f64) -> AdamConfig {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            decay: Decay::Decoupled,
        }
    }

    /// PyTorch's `Adam` defaults with the given (L2) weight decay.
    pub fn adam(weight_decay: f64) -> AdamConfig {
        AdamConfig {
            decay: Decay::L2,
            ..AdamConfig::adamw(weight_decay)
        }
    }
}

/// The default parameter groups: no weight decay on biases and LayerNorm parameters.
pub fn decays_by_default(name: &str) -> bool {
    !(name.contains("bias") || name.contains("LayerNorm"))
}

struct Moments {
    step: u64,
    m: Tensor,
    v: Tensor,
}

/// Adam / AdamW over named parameters.
pub struct Adam {
    pub config: AdamConfig,
    state: BTreeMap<String, Moments>,
    decays: Box<dyn Fn(&str) -> bool + Send + Sync>,
    /// What the device backend keeps between steps (where the parameters and moments live).
    device_cache: OptimizerCache,
}

impl Adam {
    /// `decays(name)` selects the parameter group with weight decay; the rest get none.
    pub fn new(config: AdamConfig, decays: impl Fn(&str) -> bool + Send + Sync + 'static) -> Adam {
        Adam {
            config,
            state: BTreeMap::new(),
            decays: Box::new(decays),
            device_cache: None,
        }
    }

    /// Applies one update at learning rate `lr` to every parameter that has a gradient: on a
    /// device all of them in one multi-tensor launch, on the host in chunks spread over the
    /// threads.
    pub fn step(&mut self, params: &mut Params, grads: &Gradients, lr: f64) -> Result<()> {
        let mut stepped: BTreeMap<&str, (&mut Tensor, &Tensor, f64)> = BTreeMap::new();
        for (name, var) in params.iter_mut() {
            let Some(grad) = grads.get(var) else { continue };
            let p = var.value_mut()?;
            if !matches!(p.dtype(), DType::F32 | DType::F64) || grad.dtype() != p.dtype() {
                return Err(AutogradError::Optim(format!(
                    "parameter `{name}` is {:?} with a {:?} gradient; Adam takes f32 or f64",
                    p.dtype(),
                    grad.dtype()
                )));
            }
            let device = grad.device();
            if !self.state.contains_key(name) {
                let zeros = || -> Result<Tensor> {
                    Ok(match &device {
                        Device::Cpu => Tensor::zeros(grad.shape(), grad.dtype()),
                        Device::Accelerator(be) => be.zeros(grad.shape())?,
                    })
                };
                let (m, v) = (zeros()?, zeros()?);
                self.state
                    .insert(name.to_string(), Moments { step: 0, m, v });
            }
            let moments = self.state.get_mut(name).expect("inserted above");
            // State restored from a checkpoint is on the host until its first step on a device.
            if moments.m.device() != device {
                moments.m = device.place(&moments.m)?;
                moments.v = device.place(&moments.v)?;
            }
            moments.step += 1;
            let wd = if (self.decays)(name) {
                self.config.weight_decay
            } else {
                0.0
            };
            stepped.insert(name, (p, grad, wd));
        }
        // Each stepped parameter beside its moments (both maps are in name order).
        let mut on_device = Vec::new();
        let mut f32_chunks = Vec::new();
        let mut f64_chunks = Vec::new();
        for (name, moments) in &mut self.state {
            let Some((param, grad, weight_decay)) = stepped.remove(name.as_str()) else {
                continue;
            };
            let update = AdamUpdate {
                lr,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay,
                decoupled: self.config.decay == Decay::Decoupled,
                step: moments.step,
            };
            if backend_of("adam", &[param, grad])?.is_some() {
                on_device.push(AdamParameter {
                    update,
                    param,
                    grad,
                    m: &mut moments.m,
                    v: &mut moments.v,
                });
            } else if param.dtype() == DType::F32 {
                f32_chunks.extend(host_chunks::<f32>(update, param, grad, moments)?);
            } else {
                f64_chunks.extend(host_chunks::<f64>(update, param, grad, moments)?);
            }
        }
        parallel_each(f32_chunks, HostChunk::update);
        parallel_each(f64_chunks, HostChunk::update);
        if let Some(first) = on_device.first() {
            let be = backend_of("adam", &[&*first.param])?.expect("a device tensor has a backend");
            be.adam_update(&mut on_device, &mut self.device_cache)?;
        }
        Ok(())
    }

    /// Number of parameters that have optimiser state (frozen ones never do).
    pub fn state_len(&self) -> usize {
        self.state.len()
    }

    /// Saves the moments and step counts (safetensors: `NAME.m`, `NAME.v`, `NAME.step`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (name, s) in &self.state {
            tensors.insert(format!("{name}.m"), s.m.clone());
            tensors.insert(format!("{name}.v"), s.v.clone());
            tensors.insert(format!("{name}.step"), Tensor::scalar(s.step as i64));
        }
        Ok(safetensors::save(path, &tensors, &BTreeMap::new())?)
    }

    /// Restores state written by [`Adam::save`], replacing any current state.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut tensors = safetensors::load(path)?.tensors;
        let names: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".step"))
            .map(str::to_string)
            .collect();
        let mut state = BTreeMap::new();
        for name in names {
            let mut take = |suffix: &str| {
                tensors.remove(&format!("{name}{suffix}")).ok_or_else(|| {
                    AutogradError::Optim(format!("{}: `{name}{suffix}` is missing", path.display()))
                })
            };
            let step = match take(".step")?.to_vec::<i64>()[..] {
                [step] if step >= 0 => step as u64,
                ref other => {
                    return Err(AutogradError::Optim(format!(
                        "{}: `{name}.step` must be one non-negative count, found {other:?}",
                        path.display()
                    )))
                }
            };
            state.insert(
                name.clone(),
                Moments {
                    step,
                    m: take(".m")?,
                    v: take(".v")?,
                },
            );
        }
        self.state = state;
        Ok(())
    }
}

/// Elements per host task: 64 K (256 KiB of f32 per operand), so the word embeddings spread over
/// the threads and a LayerNorm vector is one task.
const HOST_CHUNK: usize = 1 << 16;

/// A slice of one parameter, its gradient and moments, updated by one host task.
struct HostChunk<'a, F> {
    scalars: HostScalars<F>,
    p: &'a mut [F],
    g: &'a [F],
    m: &'a mut [F],
    v: &'a mut [F],
}

/// One update's scalars, computed in f64 and rounded once (as the device kernel takes them).
#[derive(Clone, Copy)]
struct HostScalars<F> {
    step_size: F,
    bc2_sqrt: F,
    beta1: F,
    beta2: F,
    one_minus_beta1: F,
    one_minus_beta2: F,
    eps: F,
    /// `1 − lr·wd` for decoupled decay, else none.
    decoupled_keep: Option<F>,
    l2: F,
}

/// `param` and its moments cut into [`HOST_CHUNK`]-element tasks.
fn host_chunks<'a, F: Float>(
    u: AdamUpdate,
    param: &'a mut Tensor,
    grad: &'a Tensor,
    moments: &'a mut Moments,
) -> Result<Vec<HostChunk<'a, F>>> {
    let t = u.step as i32;
    let f = F::from_f64;
    let scalars = HostScalars {
        step_size: f(u.lr / (1.0 - u.beta1.powi(t))),
        bc2_sqrt: f((1.0 - u.beta2.powi(t)).sqrt()),
        beta1: f(u.beta1),
        beta2: f(u.beta2),
        one_minus_beta1: f(1.0 - u.beta1),
        one_minus_beta2: f(1.0 - u.beta2),
        eps: f(u.eps),
        decoupled_keep: (u.decoupled && u.weight_decay != 0.0)
            .then(|| f(1.0 - u.lr * u.weight_decay)),
        l2: f(if u.decoupled { 0.0 } else { u.weight_decay }),
    };
    let chunks = param
        .values_mut::<F>()?
        .chunks_mut(HOST_CHUNK)
        .zip(grad.values::<F>()?.chunks(HOST_CHUNK))
        .zip(moments.m.values_mut::<F>()?.chunks_mut(HOST_CHUNK))
        .zip(moments.v.values_mut::<F>()?.chunks_mut(HOST_CHUNK))
        .map(|(((p, g), m), v)| HostChunk {
            scalars,
            p,
            g,
            m,
            v,
        })
        .collect();
    Ok(chunks)
}

impl<F: Float> HostChunk<'_, F> {
    fn update(self) {
        let s = self.scalars;
        for i in 0..self.p.len() {
            let gi = self.g[i] + s.l2 * self.p[i];
            if let Some(keep) = s.decoupled_keep {
                self.p[i] *= keep;
            }
            self.m[i] = s.beta1 * self.m[i] + s.one_minus_beta1 * gi;
            self.v[i] = s.beta2 * self.v[i] + s.one_minus_beta2 * gi * gi;
            self.p[i] -= s.step_size * self.m[i] / (self.v[i].sqrt() / s.bc2_sqrt + s.eps);
        }
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping (PyTorch's `clip_grad_norm_`, including its 1e-6 guard). On a device the sum of
/// squares is one reduction over every gradient, read back once, and the scaling runs there too.
pub fn clip_grad_norm(grads: &mut Gradients, params: &Params, max_norm: f64) -> Result<f64> {
    let present: Vec<&Tensor> = params.iter().filter_map(|(_, v)| grads.get(v)).collect();
    let total = match backend_of("clip_grad_norm", &present)? {
        Some(be) => be.sum_of_squares(&present)?,
        None => present
            .iter()
            .map(|g| scalpel_tensor::ops::sum_of_squares(g))
            .sum::<Result<f64, _>>()?,
    };
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, var) in params.iter() {
            if let Some(g) = grads.get_mut(var) {
                match backend_of("clip_grad_norm", &[g])? {
                    Some(be) => be.scale_in_place(g, coef)?,
                    None => *g = scalpel_tensor::ops::scale(g, coef)?,
                }
            }
        }
    }
    Ok(norm)
}

/// Learning-rate schedules: linear warm-up from 0, then constant or a decay to 0 at `total`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    /// Learning rate for 1-based `step` of `total`.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step <= warmup && warmup > 0 {
            return base * step as f64 / warmup as f64;
        }
        let span = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        match self {
            Schedule::Constant => base,
            Schedule::Linear => base * (1.0 - progress),
            Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}
