use scalpel_cuda::{ops as cuda, Runtime};
use scalpel_tensor::cpu::gemm::{GemmShape, PackedB};
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::{backward_runtime, download, runtime_for, upload};
use crate::ops::gelu_in_place;
use crate::{Backward, Result, Var};

struct Linear {
    has_bias: bool,
    rt: Option<Runtime>,
}

impl Backward for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (inputs[0].value(), inputs[1].value());
        let (dx, dw, db) = match backward_runtime(&self.rt, grad) {
            Some(rt) => linear_backward_cuda(&rt, x, w, grad, needs[0])?,
            None => tops::linear_backward(x, w, grad, needs[0])?,
        };
        let mut out = vec![dx, needs[1].then_some(dw)];
        if self.has_bias {
            out.push(needs[2].then_some(db));
        }
        Ok(out)
    }
}

/// `y = x·Wᵀ + b` over the last dimension (PyTorch's `nn.Linear`, `W` is `[out, in]`).
pub fn linear(x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let mut tensors = vec![x.value(), w.value()];
    tensors.extend(b.map(Var::value));
    let rt = runtime_for(&tensors);
    let y = match &rt {
        Some(rt) => linear_cuda(rt, x.value(), w.value(), b.map(Var::value))?,
        None => linear_cpu(x, w, b)?,
    };
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(b.cloned());
    Ok(Var::from_op(
        y,
        Linear {
            has_bias: b.is_some(),
            rt,
        },
        inputs,
    ))
}

/// Inputs of at most this many rows multiply a constant weight from its packing made once
/// ([`Var::packed_linear_weight`]): for them, packing the weight on every call would cost more
/// than the product. Larger inputs amortise the per-call packing and keep memory flat (a packed
/// copy of every weight would add the model's size again).
const PREPACKED_MAX_ROWS: usize = 512;

/// The packing of `w` to multiply `x` with, if `x` is small enough to want one.
fn packed_weight_for<'a>(x: &Var, w: &'a Var) -> Option<&'a PackedB> {
    let rows = x.value().numel() / x.shape().last().copied().unwrap_or(1).max(1);
    (rows <= PREPACKED_MAX_ROWS)
        .then(|| w.packed_linear_weight())
        .flatten()
}

fn linear_cpu(x: &Var, w: &Var, b: Option<&Var>) -> Result<Tensor> {
    Ok(match packed_weight_for(x, w) {
        Some(packed) => tops::linear_prepacked(x.value(), w.value(), packed, b.map(Var::value))?,
        None => tops::linear(x.value(), w.value(), b.map(Var::value))?,
    })
}

/// `gelu(x·Wᵀ + b)`, a transformer's FFN up-projection. At inference (nothing needs a gradient,
/// no device in use) the GEMM applies the GELU to each tile as it stores it, saving a pass over
/// the block's largest activation; otherwise this is [`gelu_in_place`] of [`linear`], gradients
/// included.
pub fn linear_gelu(x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let mut tensors = vec![x.value(), w.value()];
    tensors.extend(b.map(Var::value));
    let constants = !x.requires_grad() && !w.requires_grad() && !b.is_some_and(Var::requires_grad);
    if constants && runtime_for(&tensors).is_none() {
        let packed = packed_weight_for(x, w);
        let y = tops::linear_gelu(x.value(), w.value(), packed, b.map(Var::value))?;
        return Ok(Var::constant(y));
    }
    gelu_in_place(linear(x, w, b)?)
}

fn linear_cuda(rt: &Runtime, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // The CPU op checks the shapes; on success its result's shape is the one to produce.
    if w.rank() != 2 || x.rank() == 0 || x.dim(-1) != w.dim(1) {
        return Ok(tops::linear(x, w, b)?);
    }
    if let Some(b) = b {
        if b.shape() != [w.dim(0)] {
            return Ok(tops::linear(x, w, Some(b))?);
        }
    }
    let (out_f, in_f) = (w.dim(0), w.dim(1));
    let rows = x.numel() / in_f.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = out_f;
    let s = GemmShape {
        m: rows,
        n: out_f,
        k: in_f,
        trans_a: false,
        trans_b: true,
    };
    let (xd, wd) = (upload(rt, x)?, upload(rt, w)?);
    let mut y = rt.zeros::<f32>(rows * out_f)?;
    cuda::gemm(rt, s, &xd, &wd, &mut y, 0.0)?;
    if let Some(b) = b {
        cuda::add_bias(rt, out_f, &upload(rt, b)?, &mut y)?;
    }
    download(&y, &shape)
}

#[allow(clippy::type_complexity)]
fn linear_backward_cuda(
    rt: &Runtime,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (out_f, in_f) = (w.dim(0), w.dim(1));
    let rows = x.numel() / in_f.max(1);
    let (xd, wd, dyd) = (upload(rt, x)?, upload(rt, w)?, upload(rt, dy)?);
    let dx = if need_dx {
        let mut dx = rt.zeros::<f32>(x.numel())?;
        let s = GemmShape {
            m: rows,
            n: in_f,
            k: out_f,
            trans_a: false,
            trans_b: false,
        };
        cuda::gemm(rt, s, &dyd, &wd, &mut dx, 0.0)?;
        Some(download(&dx, x.shape())?)
    } else {
        None
    };
    let mut dw = rt.zeros::<f32>(w.numel())?;
    let s = GemmShape {
        m: out_f,
        n: in_f,
        k: rows,
        trans_a: true,
        trans_b: false,
    };
    cuda::gemm(rt, s, &dyd, &xd, &mut dw, 0.0)?;
    let mut db = rt.zeros::<f32>(out_f)?;
    cuda::bias_backward(rt, out_f, &dyd, &mut db)?;
    Ok((dx, download(&dw, w.shape())?, download(&db, &[out_f])?))
}

struct MatMul {
    trans_a: bool,
    trans_b: bool,
    rt: Option<Runtime>,
}

impl Backward for MatMul {
    fn name(&self) -> &'static str {
        "matmul"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (a, b) = (inputs[0].value(), inputs[1].value());
        let (ta, tb) = (self.trans_a, self.trans_b);
        let (da, db) = match backward_runtime(&self.rt, grad) {
            // As tops::matmul_backward: dA = dC·op(B)ᵀ, dB = op(A)ᵀ·dC, stored transposed back
            // where the operand was.
            Some(rt) => {
                let da = if ta {
                    matmul_cuda(&rt, b, grad, tb, true)?
                } else {
                    matmul_cuda(&rt, grad, b, false, !tb)?
                };
                let db = if tb {
                    matmul_cuda(&rt, grad, a, true, ta)?
                } else {
                    matmul_cuda(&rt, a, grad, !ta, false)?
                };
                (da, db)
            }
            None => tops::matmul_backward(a, b, ta, tb, grad)?,
        };
        Ok(vec![needs[0].then_some(da), needs[1].then_some(db)])
    }
}

/// Batched `op(a)·op(b)`.
pub fn matmul(a: &Var, b: &Var, trans_a: bool, trans_b: bool) -> Result<Var> {
    let rt = runtime_for(&[a.value(), b.value()]);
    let c = match &rt {
        Some(rt) => matmul_cuda(rt, a.value(), b.value(), trans_a, trans_b)?,
        None => tops::matmul(a.value(), b.value(), trans_a, trans_b)?,
    };
    Ok(Var::from_op(
        c,
        MatMul {
            trans_a,
            trans_b,
            rt,
        },
        vec![a.clone(), b.clone()],
    ))
}

/// One GEMM launch per matrix of the batch (the kernels take one matrix each).
fn matmul_cuda(
    rt: &Runtime,
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor> {
    if a.rank() < 2 || b.rank() < 2 {
        return Ok(tops::matmul(a, b, trans_a, trans_b)?);
    }
    let (ra, ca) = (a.dim(-2), a.dim(-1));
    let (rb, cb) = (b.dim(-2), b.dim(-1));
    let (m, k) = if trans_a { (ca, ra) } else { (ra, ca) };
    let (k2, n) = if trans_b { (cb, rb) } else { (rb, cb) };
    let lead = &a.shape()[..a.rank() - 2];
    if k != k2 || lead != &b.shape()[..b.rank() - 2] {
        // The CPU op reports the mismatch.
        return Ok(tops::matmul(a, b, trans_a, trans_b)?);
    }
    let batch: usize = lead.iter().product();
    let s = GemmShape {
        m,
        n,
        k,
        trans_a,
        trans_b,
    };
    let (av, bv) = (a.values::<f32>()?, b.values::<f32>()?);
    let mut out = Vec::with_capacity(batch * m * n);
    for i in 0..batch {
        let ad = rt.upload(&av[i * m * k..(i + 1) * m * k])?;
        let bd = rt.upload(&bv[i * k * n..(i + 1) * k * n])?;
        let mut c = rt.zeros::<f32>(m * n)?;
        cuda::gemm(rt, s, &ad, &bd, &mut c, 0.0)?;
        out.extend(c.to_host()?);
    }
    let mut shape = lead.to_vec();
    shape.extend([m, n]);
    Ok(Tensor::from_vec(&shape, out)?)
}
