//! Where a tensor lives and what runs on it there.
//!
//! A [`Tensor`]'s storage is host memory or [`DeviceMemory`] owned by a device [`Backend`] (a GPU
//! or the CUDA emulator, implemented in `scalpel-cuda`). An op dispatches on its inputs' storage:
//! host tensors run the CPU kernels of this crate ([`crate::ops`]), device tensors run their
//! backend's kernels, and the data never crosses the bus except through [`Backend::to_device`]
//! and [`Tensor::to_host`]. The methods mirror [`crate::ops`] one for one (same arguments, same
//! results, same overwrite-or-accumulate semantics), so an op's two branches read alike.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use crate::cpu::attention::AttentionShape;
use crate::cpu::gemm::Activation;
use crate::cpu::rope::Rotation;
use crate::{DType, Data, Result, Tensor};

/// Memory on a device, holding one tensor's elements. Dropping it returns the memory to its
/// backend.
pub trait DeviceMemory: Any + Send + Sync {
    /// The backend that owns the memory and runs kernels on it.
    fn backend(&self) -> Arc<dyn Backend>;
    fn dtype(&self) -> DType;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies the elements to the host (counted as device→host traffic).
    fn read(&self) -> Result<Data>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The runtime's traffic and allocation counters since it was created (`--device-stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    pub h2d_bytes: u64,
    pub d2h_bytes: u64,
    /// Allocations from the driver (the caching allocator's misses).
    pub driver_allocs: u64,
    pub driver_frees: u64,
    pub launches: u64,
    /// Most bytes held from the driver at once (live tensors plus the allocator's cache).
    pub peak_device_bytes: u64,
}

impl DeviceStats {
    /// Counts since `earlier` (the peak is this snapshot's).
    pub fn since(&self, earlier: &DeviceStats) -> DeviceStats {
        DeviceStats {
            h2d_bytes: self.h2d_bytes - earlier.h2d_bytes,
            d2h_bytes: self.d2h_bytes - earlier.d2h_bytes,
            driver_allocs: self.driver_allocs - earlier.driver_allocs,
            driver_frees: self.driver_frees - earlier.driver_frees,
            launches: self.launches - earlier.launches,
            peak_device_bytes: self.peak_device_bytes,
        }
    }
}

/// The hyper-parameters of one Adam/AdamW update of one parameter (`step` counts from 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamUpdate {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (`p *= 1 − lr·wd`) rather than Adam's L2 term (`g += wd·p`).
    pub decoupled: bool,
    pub step: u64,
}

/// One parameter of an optimiser step on a device: the update's hyper-parameters, the parameter
/// and its moments (updated in place), its gradient.
pub struct AdamParameter<'a> {
    pub update: AdamUpdate,
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
}

/// What a backend keeps for an optimiser from one step to the next (a device's table of where
/// the parameters live), owned by the optimiser and opaque to it.
pub type OptimizerCache = Option<Box<dyn Any + Send + Sync>>;

/// The kernels a device provides, over tensors it holds (f32). Each method is the device twin
/// of the [`crate::ops`] function of the same name and checks shapes the same way.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub trait Backend: Send + Sync {
    /// `emu (CPU emulator)`, `cuda (NVIDIA H100 ... (sm_90))`.
    fn name(&self) -> String;
    /// Two handles on the same device compare equal.
    fn id(&self) -> usize;
    fn stats(&self) -> DeviceStats;
    /// The implementation itself (a kernel benchmark needs the CUDA runtime, not the trait).
    fn as_any(&self) -> &dyn Any;

    /// A copy of host tensor `t` on this device.
    fn to_device(&self, t: &Tensor) -> Result<Tensor>;
    /// A long-lived f32 tensor of zeros on this device (optimiser state).
    fn zeros(&self, shape: &[usize]) -> Result<Tensor>;

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor>;
    /// `x *= alpha` in place.
    fn scale_in_place(&self, x: &mut Tensor, alpha: f64) -> Result<()>;
    /// `act(x·Wᵀ + b)`, the activation applied by the GEMM's epilogue; with
    /// `keep_pre_activation` (training: the activation's backward reads it) also `x·Wᵀ + b`,
    /// stored by the same epilogue.
    fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        activation: Activation,
        keep_pre_activation: bool,
    ) -> Result<(Tensor, Option<Tensor>)>;
    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)>;
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor>;
    fn gelu(&self, x: &Tensor) -> Result<Tensor>;
    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor>;
    /// `x` times the counter-based dropout mask of `(p, seed)` (`ops::dropout`), forward and
    /// backward alike.
    fn dropout(&self, x: &Tensor, p: f64, seed: u64) -> Result<Tensor>;
    /// LayerNorm of `x`, or with a residual of `x + residual` in one pass (the sum returned).
    fn layernorm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<LayerNormOutput>;
    fn layernorm_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)>;
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        heads: usize,
    ) -> Result<(Tensor, Tensor)>;
    fn attention_backward(
        &self,
        shape: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)>;
    /// `ids` as an `I32` tensor of `shape` on this device.
    fn indices(&self, ids: &[usize], shape: &[usize]) -> Result<Tensor>;
    /// An `I32` tensor of `shape` whose element `i` is `i mod period`, made on the device.
    fn repeated_range(&self, shape: &[usize], period: usize) -> Result<Tensor>;
    /// Rows of `table` for the `I32` device tensor `ids` (checked against the table by whoever
    /// made them), as `[ids.numel(), dim]`.
    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor>;
    fn embedding_backward(
        &self,
        table_shape: &[usize],
        ids: &Tensor,
        dout: &Tensor,
    ) -> Result<Tensor>;
    fn mean_pool(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor>;
    fn mean_pool_backward(&self, mask: &Tensor, x_shape: &[usize], dout: &Tensor)
        -> Result<Tensor>;
    fn l2_normalize(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;
    fn l2_normalize_backward(&self, y: &Tensor, norms: &Tensor, dy: &Tensor) -> Result<Tensor>;
    /// Mean softmax cross-entropy and the probabilities (the loss is read back: 4 bytes).
    fn cross_entropy(&self, logits: &Tensor, targets: &[usize]) -> Result<(f64, Tensor)>;
    fn cross_entropy_backward(
        &self,
        probs: &Tensor,
        targets: &[usize],
        dloss: f64,
    ) -> Result<Tensor>;
    /// `alpha·(a − b)`.
    fn scaled_difference(&self, a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor>;
    /// `Σ` over every tensor of `Σ x²`, reduced on the device and read back once (4 bytes).
    fn sum_of_squares(&self, tensors: &[&Tensor]) -> Result<f64>;
    /// One Adam/AdamW update of every parameter given (and of its moments, in place), in one
    /// launch; `cache` is the backend's own state kept by the optimiser between its steps.
    fn adam_update(
        &self,
        params: &mut [AdamParameter<'_>],
        cache: &mut OptimizerCache,
    ) -> Result<()>;

    // The Llama decoder's ops (`crate::decoder_ops`) and the row copies of its KV cache.
    fn rmsnorm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)>;
    fn rmsnorm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)>;
    /// The positions must be consecutive (`p, p+1, …`, what a forward and a decoding step
    /// pass): the device computes the angles from the first, so none cross the bus.
    fn rope(
        &self,
        x: &Tensor,
        head_dim: usize,
        positions: &[usize],
        theta: f64,
        rotation: Rotation,
    ) -> Result<Tensor>;
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)>;
    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
    ) -> Result<(Tensor, Tensor)>;
    fn causal_attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)>;
    /// [`Tensor::concat`] of f32 tensors on this device (shapes checked by the caller).
    fn concat(&self, parts: &[&Tensor], shape: &[usize]) -> Result<Tensor>;
    /// [`Tensor::rows`] of an f32 tensor on this device (the range checked by the caller).
    fn rows(&self, t: &Tensor, range: Range<usize>) -> Result<Tensor>;
}

/// A device LayerNorm's results: the output, the per-row statistics its backward reads, and, when
/// a residual was added first, the sum that was normalised (the backward's input).
pub struct LayerNormOutput {
    pub y: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
    pub sum: Option<Tensor>,
}

/// Where a tensor's storage is: host memory, or a device backend.
#[derive(Clone, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// A device backend (a GPU, or the CUDA kernels on the CPU emulator).
    Accelerator(Arc<dyn Backend>),
}

impl Device {
    /// `cpu`, `emu (CPU emulator)` or `cuda (NVIDIA H100 ... (sm_90))`.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Accelerator(b) => b.name(),
        }
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn backend(&self) -> Option<&Arc<dyn Backend>> {
        match self {
            Device::Cpu => None,
            Device::Accelerator(b) => Some(b),
        }
    }

    /// `t` on this device: a copy if it is elsewhere, `t` itself (shared) if it is here already.
    pub fn place(&self, t: &Tensor) -> Result<Tensor> {
        match (self, t.device()) {
            (Device::Cpu, Device::Cpu) => Ok(t.clone()),
            (Device::Cpu, Device::Accelerator(_)) => t.to_host(),
            (Device::Accelerator(b), Device::Accelerator(from)) if b.id() == from.id() => {
                Ok(t.clone())
            }
            (Device::Accelerator(b), Device::Cpu) => b.to_device(t),
            (Device::Accelerator(b), Device::Accelerator(_)) => b.to_device(&t.to_host()?),
        }
    }

    /// Counters of the device's runtime (`None` on the CPU).
    pub fn stats(&self) -> Option<DeviceStats> {
        self.backend().map(|b| b.stats())
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Accelerator(a), Device::Accelerator(b)) => a.id() == b.id(),
            _ => false,
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}
