//! Tensor-level entry points of the decoder (Llama) ops: shape checks, output allocation and
//! dtype dispatch to [`crate::cpu`] ([`rmsnorm`](crate::cpu::rmsnorm),
//! [`rope`](crate::cpu::rope), [`swiglu`](crate::cpu::swiglu),
//! [`causal_attention`](crate::cpu::causal_attention)), as [`crate::ops`] does for the encoder's.

use crate::cpu::causal_attention::{self as attn, CausalAttentionShape};
use crate::cpu::rmsnorm::{self, RmsNormShape};
use crate::cpu::rope::{self, RopeTable, Rotation};
use crate::cpu::swiglu;
use crate::ops::{dispatch_float, expect_shape, same_dtype};
use crate::{DType, Float, Result, Tensor, TensorError};

/// The rows and columns [`rmsnorm`] normalises (`x`'s last dimension, matching `w`).
pub fn rmsnorm_shape(x: &Tensor, w: &Tensor, eps: f64) -> Result<RmsNormShape> {
    same_dtype("rmsnorm", &[x, w])?;
    let cols = match x.shape().last() {
        Some(&c) if c > 0 => c,
        _ => {
            return Err(TensorError::shape(
                "rmsnorm",
                format!("x {:?} has no last dimension to normalise", x.shape()),
            ))
        }
    };
    expect_shape("rmsnorm", "weight", w, &[cols])?;
    Ok(RmsNormShape {
        rows: x.numel() / cols,
        cols,
        eps,
    })
}

/// RMSNorm over the last dimension with weight `w`: returns `y` and the per-row `rstd`
/// (shape `x.shape()[..rank-1]`).
pub fn rmsnorm(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    fn run<F: Float>(x: &Tensor, w: &Tensor, s: RmsNormShape) -> Result<(Tensor, Tensor)> {
        let mut y = Tensor::zeros(x.shape(), F::DTYPE);
        let mut rstd = Tensor::zeros(&x.shape()[..x.rank() - 1], F::DTYPE);
        rmsnorm::rmsnorm_forward(
            &s,
            x.values::<F>()?,
            w.values::<F>()?,
            y.values_mut::<F>()?,
            rstd.values_mut::<F>()?,
        );
        Ok((y, rstd))
    }
    let s = rmsnorm_shape(x, w, eps)?;
    dispatch_float!("rmsnorm", x.dtype(), run(x, w, s))
}

/// `(dx, dw)` of [`rmsnorm`] for the upstream gradient `dy`.
pub fn rmsnorm_backward(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    fn run<F: Float>(
        s: RmsNormShape,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let mut dx = Tensor::zeros(x.shape(), F::DTYPE);
        let mut dw = Tensor::zeros(w.shape(), F::DTYPE);
        rmsnorm::rmsnorm_backward_reference(
            &s,
            x.values::<F>()?,
            w.values::<F>()?,
            rstd.values::<F>()?,
            dy.values::<F>()?,
            dx.values_mut::<F>()?,
            dw.values_mut::<F>()?,
        );
        Ok((dx, dw))
    }
    let s = rmsnorm_shape(x, w, 0.0)?;
    same_dtype("rmsnorm_backward", &[x, rstd, dy])?;
    expect_shape("rmsnorm_backward", "dy", dy, x.shape())?;
    expect_shape("rmsnorm_backward", "rstd", rstd, &x.shape()[..x.rank() - 1])?;
    dispatch_float!("rmsnorm_backward", x.dtype(), run(s, x, w, rstd, dy))
}

/// Checks that `x` is `[batch, positions.len(), heads·head_dim]` with an even `head_dim`.
pub fn rope_shape(x: &Tensor, head_dim: usize, positions: &[usize]) -> Result<()> {
    if x.rank() != 3
        || head_dim == 0
        || !head_dim.is_multiple_of(2)
        || !x.dim(2).is_multiple_of(head_dim)
        || x.dim(1) != positions.len()
    {
        return Err(TensorError::shape(
            "rope",
            format!(
                "x {:?} is not [batch, {} positions, heads × an even head_dim {head_dim}]",
                x.shape(),
                positions.len()
            ),
        ));
    }
    Ok(())
}

/// Rotary embeddings of `x` `[batch, seq, heads·head_dim]` at `positions` (one per row of a
/// sequence) with base `theta`; [`Rotation::Inverse`] applies the transpose (the backward).
pub fn rope(
    x: &Tensor,
    head_dim: usize,
    positions: &[usize],
    theta: f64,
    rotation: Rotation,
) -> Result<Tensor> {
    fn run<F: Float>(
        x: &Tensor,
        head_dim: usize,
        positions: &[usize],
        theta: f64,
        rotation: Rotation,
    ) -> Result<Tensor> {
        let table = RopeTable::<F>::new(head_dim, theta, positions);
        let mut y = Tensor::zeros(x.shape(), F::DTYPE);
        rope::rope(
            &table,
            rotation,
            x.dim(2),
            x.values::<F>()?,
            y.values_mut::<F>()?,
        );
        Ok(y)
    }
    rope_shape(x, head_dim, positions)?;
    dispatch_float!(
        "rope",
        x.dtype(),
        run(x, head_dim, positions, theta, rotation)
    )
}

/// `silu(gate)·up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let mut y = Tensor::zeros(gate.shape(), F::DTYPE);
        swiglu::swiglu_forward(gate.values::<F>()?, up.values::<F>()?, y.values_mut::<F>()?);
        Ok(y)
    }
    same_dtype("swiglu", &[gate, up])?;
    expect_shape("swiglu", "up", up, gate.shape())?;
    dispatch_float!("swiglu", gate.dtype(), run(gate, up))
}

/// `(dgate, dup)` of [`swiglu`].
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    fn run<F: Float>(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut dgate = Tensor::zeros(gate.shape(), F::DTYPE);
        let mut dup = Tensor::zeros(gate.shape(), F::DTYPE);
        swiglu::swiglu_backward_reference(
            gate.values::<F>()?,
            up.values::<F>()?,
            dy.values::<F>()?,
            dgate.values_mut::<F>()?,
            dup.values_mut::<F>()?,
        );
        Ok((dgate, dup))
    }
    same_dtype("swiglu_backward", &[gate, up, dy])?;
    expect_shape("swiglu_backward", "up", up, gate.shape())?;
    expect_shape("swiglu_backward", "dy", dy, gate.shape())?;
    dispatch_float!("swiglu_backward", gate.dtype(), run(gate, up, dy))
}

/// The shape of a causal attention of `q` `[batch, q_len, heads·d]` over `k`, `v`
/// `[batch, kv_len, kv_heads·d]`, `kv_len ≥ q_len`.
pub fn causal_attention_shape(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<CausalAttentionShape> {
    same_dtype("causal_attention", &[q, k, v])?;
    let fail = |detail: String| Err(TensorError::shape("causal_attention", detail));
    if q.rank() != 3 || heads == 0 || !q.dim(2).is_multiple_of(heads) {
        return fail(format!("q {:?} cannot split into {heads} heads", q.shape()));
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return fail(format!(
            "{heads} query heads cannot share {kv_heads} key/value heads"
        ));
    }
    let head_dim = q.dim(2) / heads;
    if k.rank() != 3 || k.dim(0) != q.dim(0) || k.dim(1) < q.dim(1) {
        return fail(format!(
            "k {:?} does not hold at least the {} positions of q {:?}",
            k.shape(),
            q.dim(1),
            q.shape()
        ));
    }
    expect_shape(
        "causal_attention",
        "k",
        k,
        &[q.dim(0), k.dim(1), kv_heads * head_dim],
    )?;
    expect_shape("causal_attention", "v", v, k.shape())?;
    Ok(CausalAttentionShape {
        batch: q.dim(0),
        q_len: q.dim(1),
        kv_len: k.dim(1),
        heads,
        kv_heads,
        head_dim,
    })
}

/// Causal grouped-query attention: returns the output (shaped like `q`) and the per-row
/// log-sum-exp `[batch, heads, q_len]` its backward needs.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    fn run<F: Float>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        s: CausalAttentionShape,
    ) -> Result<(Tensor, Tensor)> {
        let mut out = Tensor::zeros(q.shape(), F::DTYPE);
        let mut lse = Tensor::zeros(&[s.batch, s.heads, s.q_len], F::DTYPE);
        attn::causal_attention_forward(
            &s,
            q.values::<F>()?,
            k.values::<F>()?,
            v.values::<F>()?,
            out.values_mut::<F>()?,
            lse.values_mut::<F>()?,
        );
        Ok((out, lse))
    }
    let s = causal_attention_shape(q, k, v, heads, kv_heads)?;
    dispatch_float!("causal_attention", q.dtype(), run(q, k, v, s))
}

/// `(dq, dk, dv)` of [`causal_attention`] given its output, log-sum-exp and upstream gradient.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[allow(clippy::too_many_arguments)]
    fn run<F: Float>(
        s: CausalAttentionShape,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut dq = Tensor::zeros(q.shape(), F::DTYPE);
        let mut dk = Tensor::zeros(k.shape(), F::DTYPE);
        let mut dv = Tensor::zeros(k.shape(), F::DTYPE);
        attn::causal_attention_backward(
            &s,
            q.values::<F>()?,
            k.values::<F>()?,
            v.values::<F>()?,
            out.values::<F>()?,
            lse.values::<F>()?,
            dout.values::<F>()?,
            dq.values_mut::<F>()?,
            dk.values_mut::<F>()?,
            dv.values_mut::<F>()?,
        );
        Ok((dq, dk, dv))
    }
    let s = causal_attention_shape(q, k, v, heads, kv_heads)?;
    same_dtype("causal_attention_backward", &[q, out, lse, dout])?;
    expect_shape("causal_attention_backward", "out", out, q.shape())?;
    expect_shape("causal_attention_backward", "dout", dout, q.shape())?;
    expect_shape(
        "causal_attention_backward",
        "lse",
        lse,
        &[s.batch, s.heads, s.q_len],
    )?;
    dispatch_float!(
        "causal_attention_backward",
        q.dtype(),
        run(s, q, k, v, out, lse, dout)
    )
}
