//! The [`Backend`] of `scalpel-tensor` on a [`Runtime`]: tensor-level ops over device-resident
//! f32 tensors. Each checks shapes as its `scalpel_tensor::ops` twin does, allocates its outputs
//! from the runtime's caching allocator and launches the kernels of [`crate::kernels`]; nothing is
//! copied between host and device except class indices (cross-entropy targets, which live on the
//! host), the scalars a caller reads back (a loss, a norm), and [`Backend::to_device`] /
//! [`Backend::indices`] themselves.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use scalpel_tensor::backend::{AdamParameter, LayerNormOutput, OptimizerCache};
use scalpel_tensor::cpu::attention::AttentionShape;
use scalpel_tensor::cpu::gemm::{Activation, GemmShape};
use scalpel_tensor::cpu::layernorm::LayerNormShape;
use scalpel_tensor::cpu::rope::Rotation;
use scalpel_tensor::decoder_ops::{self as dops, causal_attention_shape};
use scalpel_tensor::{ops as tops, Backend, DType, Data, DeviceMemory, DeviceStats, Tensor};
use scalpel_tensor::{Result, TensorError};

use crate::kernels::adamw::{AdamStep, AdamTables, AdamTensor, WeightDecay};
use crate::kernels::gemm::Epilogue;
use crate::kernels::{
    adamw, attention, dropout, elementwise, embedding, gelu, gemm, layernorm, pooling, reduce,
    rmsnorm, rope, softmax, swiglu,
};
use crate::{CudaError, DeviceBuffer, Runtime};

/// The widest attention head the fused kernels take.
pub const MAX_ATTENTION_HEAD_DIM: usize = 64;

fn device_error(e: CudaError) -> TensorError {
    TensorError::Device(e.to_string())
}

/// Device buffers of the element types tensors hold on a device.
macro_rules! device_memory {
    ($t:ty, $dtype:ident) => {
        impl DeviceMemory for DeviceBuffer<$t> {
            fn backend(&self) -> Arc<dyn Backend> {
                Arc::new(self.runtime().clone())
            }
            fn dtype(&self) -> DType {
                DType::$dtype
            }
            fn len(&self) -> usize {
                DeviceBuffer::len(self)
            }
            fn read(&self) -> Result<Data> {
                Ok(Data::$dtype(self.to_host().map_err(device_error)?))
            }
            fn as_any(&self) -> &dyn Any {
                self
            }
            fn as_any_mut(&mut self) -> &mut dyn Any {
                self
            }
        }
    };
}
device_memory!(f32, F32);
device_memory!(i32, I32);

impl Runtime {
    /// The f32 buffer of a tensor on this runtime; an error naming where it is otherwise.
    fn buffer<'t>(&self, what: &str, t: &'t Tensor) -> Result<&'t DeviceBuffer<f32>> {
        let buffer = t
            .device_memory()
            .and_then(|m| m.as_any().downcast_ref::<DeviceBuffer<f32>>())
            .filter(|b| b.runtime().same_as(self));
        buffer.ok_or_else(|| {
            TensorError::Device(format!(
                "{what} is a {:?} tensor on {}, not an f32 tensor on {}",
                t.dtype(),
                t.device().name(),
                self.name()
            ))
        })
    }

    /// The buffer of a tensor to update in place (copied on the device first if shared).
    fn buffer_mut<'t>(&self, what: &str, t: &'t mut Tensor) -> Result<&'t mut DeviceBuffer<f32>> {
        self.buffer(what, t)?;
        let memory = t.device_memory_mut(|shared| {
            let source = shared
                .as_any()
                .downcast_ref::<DeviceBuffer<f32>>()
                .expect("checked above");
            let mut copy = self.zeros::<f32>(source.len()).map_err(device_error)?;
            elementwise::axpy(self, 1.0, source, &mut copy).map_err(device_error)?;
            Ok(Arc::new(copy) as Arc<dyn DeviceMemory>)
        })?;
        Ok(memory
            .and_then(|m| m.as_any_mut().downcast_mut::<DeviceBuffer<f32>>())
            .expect("a device buffer of this runtime"))
    }

    fn zeros_f32(&self, len: usize) -> Result<DeviceBuffer<f32>> {
        self.zeros::<f32>(len).map_err(device_error)
    }

    fn uninit_f32(&self, len: usize) -> Result<DeviceBuffer<f32>> {
        self.uninit::<f32>(len).map_err(device_error)
    }

    /// The `I32` buffer of an index tensor on this runtime.
    fn index_buffer<'t>(&self, what: &str, t: &'t Tensor) -> Result<&'t DeviceBuffer<i32>> {
        t.device_memory()
            .and_then(|m| m.as_any().downcast_ref::<DeviceBuffer<i32>>())
            .filter(|b| b.runtime().same_as(self))
            .ok_or_else(|| {
                TensorError::Device(format!(
                    "{what} is a {:?} tensor on {}, not an I32 tensor on {}",
                    t.dtype(),
                    t.device().name(),
                    self.name()
                ))
            })
    }

    fn ids(&self, ids: &[usize]) -> Result<DeviceBuffer<i32>> {
        let ids = ids
            .iter()
            .map(|&i| {
                i32::try_from(i).map_err(|_| {
                    TensorError::Device(format!("index {i} does not fit a 32-bit int"))
                })
            })
            .collect::<Result<Vec<i32>>>()?;
        self.upload(&ids).map_err(device_error)
    }
}

fn wrap(shape: &[usize], buffer: DeviceBuffer<f32>) -> Result<Tensor> {
    Tensor::from_device(shape, Arc::new(buffer))
}

/// Converts a kernel launcher's error.
trait OrDevice<T> {
    fn dev(self) -> Result<T>;
}

impl<T> OrDevice<T> for crate::Result<T> {
    fn dev(self) -> Result<T> {
        self.map_err(device_error)
    }
}

fn layernorm_shape(x: &Tensor, gamma: &Tensor, eps: f64) -> Result<LayerNormShape> {
    let cols = if x.rank() == 0 { 0 } else { x.dim(-1) };
    tops::expect_shape("layernorm", "gamma", gamma, &[cols])?;
    if cols == 0 {
        return Err(TensorError::shape("layernorm", "no columns to normalise"));
    }
    Ok(LayerNormShape {
        rows: x.numel() / cols,
        cols,
        eps,
    })
}

fn check_ids(op: &'static str, ids: &[usize], rows: usize) -> Result<()> {
    match ids.iter().find(|&&i| i >= rows) {
        Some(bad) => Err(TensorError::shape(
            op,
            format!("index {bad} is outside the {rows} rows"),
        )),
        None => Ok(()),
    }
}

impl Backend for Runtime {
    fn name(&self) -> String {
        if self.is_emulator() {
            format!("emu ({})", Runtime::name(self))
        } else {
            format!("cuda ({})", Runtime::name(self))
        }
    }

    fn id(&self) -> usize {
        Runtime::id(self)
    }

    fn stats(&self) -> DeviceStats {
        Runtime::stats(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn to_device(&self, t: &Tensor) -> Result<Tensor> {
        let host = t.to_host()?;
        if host.dtype() == DType::I32 {
            let ids = self.upload(host.values::<i32>()?).dev()?;
            return Tensor::from_device(t.shape(), Arc::new(ids));
        }
        let values = match host.dtype() {
            DType::F32 => host.values::<f32>()?.to_vec(),
            // Storage formats widen exactly; f64 (the gradient checks) has no device kernels.
            DType::F16 | DType::BF16 => host.to_vec::<f32>(),
            dtype => {
                return Err(TensorError::DType {
                    op: "to_device",
                    dtype,
                })
            }
        };
        wrap(t.shape(), self.upload(&values).dev()?)
    }

    fn zeros(&self, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        wrap(shape, self.zeros_long_lived::<f32>(n).dev()?)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        tops::expect_shape("add", "right operand", b, a.shape())?;
        let mut out = self.uninit_f32(a.numel())?;
        elementwise::add(self, self.buffer("a", a)?, self.buffer("b", b)?, &mut out).dev()?;
        wrap(a.shape(), out)
    }

    fn scale(&self, x: &Tensor, alpha: f64) -> Result<Tensor> {
        self.scaled_difference_or_scale(x, None, alpha)
    }

    fn scale_in_place(&self, x: &mut Tensor, alpha: f64) -> Result<()> {
        let buffer = self.buffer_mut("x", x)?;
        elementwise::scale(self, alpha as f32, buffer).dev()
    }

    fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        activation: Activation,
        keep_pre_activation: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (s, shape) = tops::linear_shape(x, w, b)?;
        let mut y = self.uninit_f32(s.m * s.n)?;
        let mut pre = if keep_pre_activation {
            Some(self.uninit_f32(s.m * s.n)?)
        } else {
            None
        };
        let ep = Epilogue {
            bias: b.map(|b| self.buffer("bias", b)).transpose()?,
            beta: 0.0,
            activation,
            pre_activation: pre.as_mut(),
        };
        gemm::gemm(
            self,
            s,
            self.buffer("x", x)?,
            self.buffer("w", w)?,
            &mut y,
            ep,
        )
        .dev()?;
        Ok((wrap(&shape, y)?, pre.map(|p| wrap(&shape, p)).transpose()?))
    }

    fn linear_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let (s, y_shape) = tops::linear_shape(x, w, None)?;
        tops::expect_shape("linear backward", "dy", dy, &y_shape)?;
        let (xd, wd, dyd) = (
            self.buffer("x", x)?,
            self.buffer("w", w)?,
            self.buffer("dy", dy)?,
        );
        let (rows, out_f, in_f) = (s.m, s.n, s.k);
        let dx = if need_dx {
            let mut dx = self.uninit_f32(x.numel())?;
            let s = GemmShape {
                m: rows,
                n: in_f,
                k: out_f,
                trans_a: false,
                trans_b: false,
            };
            gemm::gemm(self, s, dyd, wd, &mut dx, Epilogue::overwrite()).dev()?;
            Some(wrap(x.shape(), dx)?)
        } else {
            None
        };
        let mut dw = self.uninit_f32(w.numel())?;
        let s = GemmShape {
            m: out_f,
            n: in_f,
            k: rows,
            trans_a: true,
            trans_b: false,
        };
        gemm::gemm(self, s, dyd, xd, &mut dw, Epilogue::overwrite()).dev()?;
        let mut db = self.zeros_f32(out_f)?;
        elementwise::bias_backward(self, out_f, dyd, &mut db).dev()?;
        Ok((dx, wrap(w.shape(), dw)?, wrap(&[out_f], db)?))
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        let (batch, s, shape) = tops::matmul_shape(a, b, trans_a, trans_b)?;
        let (ad, bd) = (self.buffer("a", a)?, self.buffer("b", b)?);
        let mut c = self.uninit_f32(batch * s.m * s.n)?;
        for i in 0..batch {
            gemm::gemm_at(
                self,
                s,
                (ad, i * s.m * s.k),
                (bd, i * s.k * s.n),
                (&mut c, i * s.m * s.n),
            )
            .dev()?;
        }
        wrap(&shape, c)
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.uninit_f32(x.numel())?;
        gelu::gelu_forward(self, self.buffer("x", x)?, &mut y).dev()?;
        wrap(x.shape(), y)
    }

    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        tops::expect_shape("gelu backward", "dy", dy, x.shape())?;
        let mut dx = self.uninit_f32(x.numel())?;
        gelu::gelu_backward(self, self.buffer("x", x)?, self.buffer("dy", dy)?, &mut dx).dev()?;
        wrap(x.shape(), dx)
    }

    fn dropout(&self, x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
        let mut y = self.uninit_f32(x.numel())?;
        dropout::dropout(self, p, seed, self.buffer("x", x)?, &mut y).dev()?;
        wrap(x.shape(), y)
    }

    fn layernorm(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<LayerNormOutput> {
        let s = layernorm_shape(x, gamma, eps)?;
        tops::expect_shape("layernorm", "beta", beta, gamma.shape())?;
        let mut y = self.uninit_f32(x.numel())?;
        let mut mean = self.uninit_f32(s.rows)?;
        let mut rstd = self.uninit_f32(s.rows)?;
        let mut sum = match residual {
            Some(r) => {
                tops::expect_shape("add_layernorm", "residual", r, x.shape())?;
                Some((self.buffer("residual", r)?, self.uninit_f32(x.numel())?))
            }
            None => None,
        };
        layernorm::layernorm_forward(
            self,
            &s,
            self.buffer("x", x)?,
            sum.as_mut().map(|(r, sum)| (*r, sum)),
            self.buffer("gamma", gamma)?,
            self.buffer("beta", beta)?,
            &mut y,
            &mut mean,
            &mut rstd,
        )
        .dev()?;
        Ok(LayerNormOutput {
            y: wrap(x.shape(), y)?,
            mean: wrap(&[s.rows], mean)?,
            rstd: wrap(&[s.rows], rstd)?,
            sum: sum.map(|(_, sum)| wrap(x.shape(), sum)).transpose()?,
        })
    }

    fn layernorm_backward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s = layernorm_shape(x, gamma, 0.0)?;
        tops::expect_shape("layernorm backward", "dy", dy, x.shape())?;
        let mut dx = self.uninit_f32(x.numel())?;
        let mut dgamma = self.zeros_f32(s.cols)?;
        let mut dbeta = self.zeros_f32(s.cols)?;
        layernorm::layernorm_backward(
            self,
            &s,
            self.buffer("x", x)?,
            self.buffer("gamma", gamma)?,
            self.buffer("mean", mean)?,
            self.buffer("rstd", rstd)?,
            self.buffer("dy", dy)?,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        )
        .dev()?;
        Ok((
            wrap(x.shape(), dx)?,
            wrap(gamma.shape(), dgamma)?,
            wrap(gamma.shape(), dbeta)?,
        ))
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        heads: usize,
    ) -> Result<(Tensor, Tensor)> {
        let s = tops::attention_shape(q, k, v, mask, heads)?;
        if s.head_dim > MAX_ATTENTION_HEAD_DIM {
            return Err(TensorError::Device(format!(
                "attention heads of {} dimensions: the CUDA kernels take at most {MAX_ATTENTION_HEAD_DIM}",
                s.head_dim
            )));
        }
        let mut out = self.uninit_f32(q.numel())?;
        let mut lse = self.uninit_f32(s.batch * s.heads * s.seq)?;
        attention::attention_forward(
            self,
            &s,
            self.buffer("q", q)?,
            self.buffer("k", k)?,
            self.buffer("v", v)?,
            self.buffer("mask", mask)?,
            false,
            &mut out,
            &mut lse,
        )
        .dev()?;
        Ok((
            wrap(q.shape(), out)?,
            wrap(&[s.batch, s.heads, s.seq], lse)?,
        ))
    }

    fn attention_backward(
        &self,
        s: &AttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        tops::expect_shape("attention backward", "dout", dout, q.shape())?;
        let n = q.numel();
        let (mut dq, mut dk, mut dv) = (self.zeros_f32(n)?, self.zeros_f32(n)?, self.zeros_f32(n)?);
        attention::attention_backward(
            self,
            s,
            self.buffer("q", q)?,
            self.buffer("k", k)?,
            self.buffer("v", v)?,
            self.buffer("mask", mask)?,
            false,
            self.buffer("out", out)?,
            self.buffer("lse", lse)?,
            self.buffer("dout", dout)?,
            &mut dq,
            &mut dk,
            &mut dv,
        )
        .dev()?;
        Ok((
            wrap(q.shape(), dq)?,
            wrap(q.shape(), dk)?,
            wrap(q.shape(), dv)?,
        ))
    }

    fn indices(&self, ids: &[usize], shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != ids.len() {
            return Err(TensorError::shape(
                "indices",
                format!("{} ids for shape {shape:?}", ids.len()),
            ));
        }
        Tensor::from_device(shape, Arc::new(self.ids(ids)?))
    }

    fn repeated_range(&self, shape: &[usize], period: usize) -> Result<Tensor> {
        let mut out = self.uninit::<i32>(shape.iter().product()).dev()?;
        embedding::repeated_range(self, period, &mut out).dev()?;
        Tensor::from_device(shape, Arc::new(out))
    }

    fn embedding(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        if table.rank() != 2 {
            return Err(TensorError::shape(
                "embedding",
                format!("table must be [vocab, dim], got {:?}", table.shape()),
            ));
        }
        let dim = table.dim(1);
        let mut out = self.uninit_f32(ids.numel() * dim)?;
        let ids_d = self.index_buffer("ids", ids)?;
        embedding::embedding_forward(self, dim, self.buffer("table", table)?, ids_d, &mut out)
            .dev()?;
        wrap(&[ids.numel(), dim], out)
    }

    fn embedding_backward(
        &self,
        table_shape: &[usize],
        ids: &Tensor,
        dout: &Tensor,
    ) -> Result<Tensor> {
        let &[rows, dim] = table_shape else {
            return Err(TensorError::shape(
                "embedding backward",
                format!("table shape {table_shape:?}"),
            ));
        };
        tops::expect_shape("embedding backward", "dout", dout, &[ids.numel(), dim])?;
        let mut dtable = self.zeros_f32(rows * dim)?;
        let ids_d = self.index_buffer("ids", ids)?;
        embedding::embedding_backward(self, dim, ids_d, self.buffer("dout", dout)?, &mut dtable)
            .dev()?;
        wrap(table_shape, dtable)
    }

    fn mean_pool(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        if x.rank() != 3 {
            return Err(TensorError::shape(
                "mean_pool",
                format!("input must be [batch, seq, dim], got {:?}", x.shape()),
            ));
        }
        tops::expect_shape("mean_pool", "mask", mask, &x.shape()[..2])?;
        let (b, s, d) = (x.dim(0), x.dim(1), x.dim(2));
        let mut out = self.uninit_f32(b * d)?;
        pooling::mean_pool_forward(
            self,
            s,
            d,
            self.buffer("x", x)?,
            self.buffer("mask", mask)?,
            &mut out,
        )
        .dev()?;
        wrap(&[b, d], out)
    }

    fn mean_pool_backward(
        &self,
        mask: &Tensor,
        x_shape: &[usize],
        dout: &Tensor,
    ) -> Result<Tensor> {
        let &[b, s, d] = x_shape else {
            return Err(TensorError::shape(
                "mean_pool backward",
                format!("input shape {x_shape:?}"),
            ));
        };
        tops::expect_shape("mean_pool backward", "dout", dout, &[b, d])?;
        let mut dx = self.uninit_f32(b * s * d)?;
        pooling::mean_pool_backward(
            self,
            s,
            d,
            self.buffer("mask", mask)?,
            self.buffer("dout", dout)?,
            &mut dx,
        )
        .dev()?;
        wrap(x_shape, dx)
    }

    fn l2_normalize(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if x.rank() == 0 {
            return Err(TensorError::shape("l2_normalize", "scalar input"));
        }
        let dim = x.dim(-1);
        let rows = x.numel() / dim.max(1);
        let mut y = self.uninit_f32(x.numel())?;
        let mut norms = self.uninit_f32(rows)?;
        pooling::l2_normalize_forward(self, dim, self.buffer("x", x)?, &mut y, &mut norms).dev()?;
        Ok((wrap(x.shape(), y)?, wrap(&[rows], norms)?))
    }

    fn l2_normalize_backward(&self, y: &Tensor, norms: &Tensor, dy: &Tensor) -> Result<Tensor> {
        tops::expect_shape("l2_normalize backward", "dy", dy, y.shape())?;
        let mut dx = self.uninit_f32(y.numel())?;
        pooling::l2_normalize_backward(
            self,
            y.dim(-1),
            self.buffer("y", y)?,
            self.buffer("norms", norms)?,
            self.buffer("dy", dy)?,
            &mut dx,
        )
        .dev()?;
        wrap(y.shape(), dx)
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &[usize]) -> Result<(f64, Tensor)> {
        if logits.rank() != 2 || logits.dim(0) != targets.len() || targets.is_empty() {
            return Err(TensorError::shape(
                "cross_entropy",
                format!(
                    "logits {:?} against {} targets",
                    logits.shape(),
                    targets.len()
                ),
            ));
        }
        check_ids("cross_entropy", targets, logits.dim(1))?;
        let mut probs = self.uninit_f32(logits.numel())?;
        let targets = self.ids(targets)?;
        let loss = softmax::cross_entropy_forward(
            self,
            logits.dim(1),
            self.buffer("logits", logits)?,
            &targets,
            &mut probs,
        )
        .dev()?;
        Ok((loss as f64, wrap(logits.shape(), probs)?))
    }

    fn cross_entropy_backward(
        &self,
        probs: &Tensor,
        targets: &[usize],
        dloss: f64,
    ) -> Result<Tensor> {
        let mut d = self.uninit_f32(probs.numel())?;
        let targets = self.ids(targets)?;
        softmax::cross_entropy_backward(
            self,
            probs.dim(1),
            self.buffer("probs", probs)?,
            &targets,
            dloss as f32,
            &mut d,
        )
        .dev()?;
        wrap(probs.shape(), d)
    }

    fn scaled_difference(&self, a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
        tops::expect_shape("difference", "b", b, a.shape())?;
        self.scaled_difference_or_scale(a, Some(b), alpha)
    }

    fn sum_of_squares(&self, tensors: &[&Tensor]) -> Result<f64> {
        let buffers = tensors
            .iter()
            .map(|t| self.buffer("tensor", t))
            .collect::<Result<Vec<_>>>()?;
        Ok(reduce::sum_of_squares_all(self, &buffers).dev()? as f64)
    }

    fn adam_update(
        &self,
        params: &mut [AdamParameter<'_>],
        cache: &mut OptimizerCache,
    ) -> Result<()> {
        let mut tensors = Vec::with_capacity(params.len());
        for p in params.iter_mut() {
            for (what, t) in [("gradient", p.grad), ("m", &*p.m), ("v", &*p.v)] {
                tops::expect_shape("adam", what, t, p.param.shape())?;
            }
            let u = &p.update;
            let step = AdamStep {
                lr: u.lr,
                beta1: u.beta1,
                beta2: u.beta2,
                eps: u.eps,
                weight_decay: u.weight_decay,
                decay: if u.decoupled {
                    WeightDecay::Decoupled
                } else {
                    WeightDecay::L2
                },
                step: u32::try_from(u.step)
                    .map_err(|_| TensorError::Device(format!("Adam step {} too large", u.step)))?,
            };
            tensors.push(AdamTensor {
                step,
                grad: self.buffer("gradient", p.grad)?,
                param: self.buffer_mut("param", p.param)?,
                m: self.buffer_mut("m", p.m)?,
                v: self.buffer_mut("v", p.v)?,
            });
        }
        let table = cache.get_or_insert_with(|| Box::new(AdamTables::default()));
        let Some(table) = table.downcast_mut::<AdamTables>() else {
            return Err(TensorError::Device(
                "adam: the optimiser's cache was made by another backend".into(),
            ));
        };
        adamw::adam_step(self, &mut tensors, table).dev()
    }

    fn rmsnorm(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let s = dops::rmsnorm_shape(x, w, eps)?;
        let mut y = self.uninit_f32(x.numel())?;
        let mut rstd = self.uninit_f32(s.rows)?;
        rmsnorm::rmsnorm_forward(
            self,
            &s,
            self.buffer("x", x)?,
            self.buffer("weight", w)?,
            &mut y,
            &mut rstd,
        )
        .dev()?;
        Ok((wrap(x.shape(), y)?, wrap(&x.shape()[..x.rank() - 1], rstd)?))
    }

    fn rmsnorm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let s = dops::rmsnorm_shape(x, w, 0.0)?;
        tops::expect_shape("rmsnorm backward", "dy", dy, x.shape())?;
        tops::expect_shape("rmsnorm backward", "rstd", rstd, &x.shape()[..x.rank() - 1])?;
        let mut dx = self.uninit_f32(x.numel())?;
        let mut dw = self.zeros_f32(s.cols)?;
        rmsnorm::rmsnorm_backward(
            self,
            &s,
            self.buffer("x", x)?,
            self.buffer("weight", w)?,
            self.buffer("rstd", rstd)?,
            self.buffer("dy", dy)?,
            &mut dx,
            &mut dw,
        )
        .dev()?;
        Ok((wrap(x.shape(), dx)?, wrap(w.shape(), dw)?))
    }

    fn rope(
        &self,
        x: &Tensor,
        head_dim: usize,
        positions: &[usize],
        theta: f64,
        rotation: Rotation,
    ) -> Result<Tensor> {
        dops::rope_shape(x, head_dim, positions)?;
        let position0 = positions.first().copied().unwrap_or(0);
        if positions
            .iter()
            .enumerate()
            .any(|(t, &p)| p != position0 + t)
        {
            return Err(TensorError::shape(
                "rope",
                format!(
                    "positions {positions:?} on {}: the device kernel takes consecutive positions",
                    Backend::name(self)
                ),
            ));
        }
        let p = rope::RopePositions {
            seq: x.dim(1),
            width: x.dim(2),
            head_dim,
            position0,
            theta,
        };
        let mut y = self.uninit_f32(x.numel())?;
        rope::rope(self, &p, rotation, self.buffer("x", x)?, &mut y).dev()?;
        wrap(x.shape(), y)
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        tops::expect_shape("swiglu", "up", up, gate.shape())?;
        let mut y = self.uninit_f32(gate.numel())?;
        swiglu::swiglu_forward(
            self,
            self.buffer("gate", gate)?,
            self.buffer("up", up)?,
            &mut y,
        )
        .dev()?;
        wrap(gate.shape(), y)
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        tops::expect_shape("swiglu backward", "up", up, gate.shape())?;
        tops::expect_shape("swiglu backward", "dy", dy, gate.shape())?;
        let (mut dgate, mut dup) = (
            self.uninit_f32(gate.numel())?,
            self.uninit_f32(gate.numel())?,
        );
        swiglu::swiglu_backward(
            self,
            self.buffer("gate", gate)?,
            self.buffer("up", up)?,
            self.buffer("dy", dy)?,
            &mut dgate,
            &mut dup,
        )
        .dev()?;
        Ok((wrap(gate.shape(), dgate)?, wrap(gate.shape(), dup)?))
    }

    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        kv_heads: usize,
    ) -> Result<(Tensor, Tensor)> {
        let s = causal_attention_shape(q, k, v, heads, kv_heads)?;
        let mut out = self.uninit_f32(q.numel())?;
        let mut lse = self.uninit_f32(s.batch * s.heads * s.q_len)?;
        let qkv = (
            self.buffer("q", q)?,
            self.buffer("k", k)?,
            self.buffer("v", v)?,
        );
        attention::causal_attention_forward(self, &s, qkv, &mut out, &mut lse).dev()?;
        Ok((
            wrap(q.shape(), out)?,
            wrap(&[s.batch, s.heads, s.q_len], lse)?,
        ))
    }

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
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let s = causal_attention_shape(q, k, v, heads, kv_heads)?;
        let op = "causal_attention backward";
        tops::expect_shape(op, "out", out, q.shape())?;
        tops::expect_shape(op, "dout", dout, q.shape())?;
        tops::expect_shape(op, "lse", lse, &[s.batch, s.heads, s.q_len])?;
        let (mut dq, mut dk, mut dv) = (
            self.uninit_f32(q.numel())?,
            self.uninit_f32(k.numel())?,
            self.uninit_f32(k.numel())?,
        );
        let qkv = (
            self.buffer("q", q)?,
            self.buffer("k", k)?,
            self.buffer("v", v)?,
        );
        attention::causal_attention_backward(
            self,
            &s,
            qkv,
            self.buffer("out", out)?,
            self.buffer("lse", lse)?,
            self.buffer("dout", dout)?,
            &mut dq,
            &mut dk,
            &mut dv,
        )
        .dev()?;
        Ok((
            wrap(q.shape(), dq)?,
            wrap(k.shape(), dk)?,
            wrap(k.shape(), dv)?,
        ))
    }

    fn concat(&self, parts: &[&Tensor], shape: &[usize]) -> Result<Tensor> {
        let mut out = self.zeros_f32(shape.iter().product())?;
        let mut at = 0;
        for (i, part) in parts.iter().enumerate() {
            let buffer = self.buffer(&format!("concat part {i}"), part)?;
            elementwise::axpy_at(self, 1.0, buffer.len(), (buffer, 0), (&mut out, at)).dev()?;
            at += buffer.len();
        }
        wrap(shape, out)
    }

    fn rows(&self, t: &Tensor, range: Range<usize>) -> Result<Tensor> {
        if t.rank() == 0 {
            return Err(TensorError::shape("rows", "a scalar has no rows"));
        }
        let row_len: usize = t.shape()[1..].iter().product();
        let mut shape = t.shape().to_vec();
        shape[0] = range.len();
        let n = range.len() * row_len;
        let mut out = self.zeros_f32(n)?;
        let from = (self.buffer("t", t)?, range.start * row_len);
        elementwise::axpy_at(self, 1.0, n, from, (&mut out, 0)).dev()?;
        wrap(&shape, out)
    }
}

impl Runtime {
    /// `alpha·(a − b)`, or `alpha·a` without `b`.
    fn scaled_difference_or_scale(
        &self,
        a: &Tensor,
        b: Option<&Tensor>,
        alpha: f64,
    ) -> Result<Tensor> {
        let mut out = self.zeros_f32(a.numel())?;
        elementwise::axpy(self, alpha as f32, self.buffer("a", a)?, &mut out).dev()?;
        if let Some(b) = b {
            elementwise::axpy(self, -alpha as f32, self.buffer("b", b)?, &mut out).dev()?;
        }
        wrap(a.shape(), out)
    }
}
