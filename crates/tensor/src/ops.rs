//! Tensor-level operations: check shapes, allocate outputs, dispatch on dtype to [`crate::cpu`].
//!
//! Forward ops that save statistics for their backward (`layernorm`, `attention`,
//! `l2_normalize`) return them alongside the output; inference simply drops them.

use std::mem::MaybeUninit;
use std::sync::Arc;

use crate::cpu::gemm::{Activation, GemmShape, PackedB};
use crate::cpu::gemm_bf16::{Bf16Input, Bf16Output, Bf16Path, PackedBf16Weight};
use crate::cpu::gemm_weights::{self, PackedWeight};
use crate::cpu::{self, attention::AttentionShape, layernorm::LayerNormShape};
use crate::{DType, Element, Float, Result, Tensor, TensorError};

/// Runs a generic implementation for the float compute types and rejects the rest by name.
macro_rules! dispatch_float {
    ($op:literal, $dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dtype => Err(TensorError::DType { op: $op, dtype }),
        }
    };
}
pub(crate) use dispatch_float;

/// The dtype all `tensors` share; an error naming both when they differ.
pub fn same_dtype(op: &'static str, tensors: &[&Tensor]) -> Result<DType> {
    let dtype = tensors[0].dtype();
    if let Some(t) = tensors.iter().find(|t| t.dtype() != dtype) {
        return Err(TensorError::shape(
            op,
            format!("mixed dtypes {dtype:?} and {:?}", t.dtype()),
        ));
    }
    Ok(dtype)
}

/// An error naming `what` unless `t` has `shape`.
pub fn expect_shape(op: &'static str, what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape() != shape {
        return Err(TensorError::shape(
            op,
            format!("{what} has shape {:?}, expected {shape:?}", t.shape()),
        ));
    }
    Ok(())
}

/// Splits `[..., rows, cols]` into (batch, rows, cols).
fn matrix_dims(op: &'static str, t: &Tensor) -> Result<(usize, usize, usize)> {
    if t.rank() < 2 {
        return Err(TensorError::shape(
            op,
            format!("need rank ≥ 2, got {:?}", t.shape()),
        ));
    }
    let r = t.rank();
    Ok((
        t.shape()[..r - 2].iter().product(),
        t.shape()[r - 2],
        t.shape()[r - 1],
    ))
}

/// `act(op(A)·op(B) + bias)` (B possibly packed) as a new tensor of `shape`. The GEMM stores
/// every element (beta = 0), so an `f32` result goes straight into an uninitialised buffer rather
/// than one zero-filled first, which would be a pass over memory as long as the product's own
/// store; the activation is applied as each tile is stored.
fn gemm_new<F: Float>(
    s: GemmShape,
    a: &[F],
    b: &[F],
    packed: Option<&PackedB>,
    bias: Option<&[F]>,
    act: Activation,
    shape: &[usize],
) -> Result<Tensor> {
    let bias32 = bias.map_or(Some(None), |b| cpu::as_f32(b).map(Some));
    if let (Some(a), Some(b), Some(bias)) = (cpu::as_f32(a), cpu::as_f32(b), bias32) {
        let mut out = Vec::with_capacity(s.m * s.n);
        let uninit = &mut out.spare_capacity_mut()[..s.m * s.n];
        cpu::gemm::gemm_into_uninit(s, a, b, packed, bias, act, uninit);
        // SAFETY: `gemm_into_uninit` initialised all m·n elements.
        unsafe { out.set_len(s.m * s.n) };
        return Tensor::from_vec(shape, out);
    }
    let mut c = Tensor::zeros(shape, F::DTYPE);
    let out = c.values_mut::<F>()?;
    match packed {
        Some(packed) => cpu::gemm::gemm_prepacked(s, a, b, packed, bias, out, F::ZERO),
        None => cpu::gemm::gemm_with_bias(s, a, b, bias, out, F::ZERO),
    }
    if act == Activation::Gelu {
        cpu::activation::gelu_forward(out);
    }
    Ok(c)
}

/// Batched `op(a)·op(b)`; leading dimensions must match exactly.
pub fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    fn run<F: Float>(
        a: &Tensor,
        b: &Tensor,
        batch: usize,
        s: GemmShape,
        shape: Vec<usize>,
    ) -> Result<Tensor> {
        let mut c = Tensor::zeros(&shape, F::DTYPE);
        cpu::gemm::gemm_batched(
            batch,
            s,
            a.values::<F>()?,
            b.values::<F>()?,
            c.values_mut::<F>()?,
            F::ZERO,
        );
        Ok(c)
    }
    let dtype = same_dtype("matmul", &[a, b])?;
    let (batch, s, shape) = matmul_shape(a, b, trans_a, trans_b)?;
    dispatch_float!("matmul", dtype, run(a, b, batch, s, shape))
}

/// Checks [`matmul`]'s operands: the batch size, one matrix's product and the result's shape.
pub fn matmul_shape(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<(usize, GemmShape, Vec<usize>)> {
    let (ba, ra, ca) = matrix_dims("matmul", a)?;
    let (bb, rb, cb) = matrix_dims("matmul", b)?;
    let (m, k) = if trans_a { (ca, ra) } else { (ra, ca) };
    let (k2, n) = if trans_b { (cb, rb) } else { (rb, cb) };
    if ba != bb || k != k2 || a.shape()[..a.rank() - 2] != b.shape()[..b.rank() - 2] {
        return Err(TensorError::shape(
            "matmul",
            format!(
                "{:?}{} · {:?}{}",
                a.shape(),
                if trans_a { "ᵀ" } else { "" },
                b.shape(),
                if trans_b { "ᵀ" } else { "" }
            ),
        ));
    }
    let mut shape = a.shape()[..a.rank() - 2].to_vec();
    shape.extend([m, n]);
    let s = GemmShape {
        m,
        n,
        k,
        trans_a,
        trans_b,
    };
    Ok((ba, s, shape))
}

/// Whether a linear's weight will be multiplied again unchanged, which lets the CPU GEMM keep a
/// packing of it ([`cpu::gemm_weights`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightUse {
    /// A constant (a frozen or inference weight): packed once and kept while it lives, as
    /// [`PACK_ONCE_MAX_ROWS`] says.
    Constant,
    /// Changes between calls (a trained parameter): never packed beyond the call.
    Varying,
}

/// Inputs of at most this many rows multiply a constant `f32` weight from its packing made once:
/// for batch-1 inputs, repacking every weight on every call cost more than the multiply. Larger
/// inputs use a packing that exists already but do not make one: they amortise the per-call
/// packing, and a packed copy of every weight adds the model's size again.
pub const PACK_ONCE_MAX_ROWS: usize = 512;

/// `act(x·Wᵀ + b)` over the last dimension of `x`; `w` is `[out, in]` as PyTorch stores it. The
/// activation is applied to each tile as the GEMM stores it (an inference fast path: no
/// pre-activation is kept for a backward). `x`, `w` and `b` share a float dtype, or `w` is `bf16`
/// with `x` and `b` `f32`: then `x` is rounded to bf16 at the GEMM's input and the products
/// accumulate in f32 (`cpu::gemm_bf16`), `w` always multiplied from a packing (kept if
/// `Constant`).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
    weight: WeightUse,
) -> Result<Tensor> {
    fn run<F: Float>(
        x: &Tensor,
        w: &Tensor,
        packed: Option<&PackedB>,
        b: Option<&Tensor>,
        act: Activation,
        s: GemmShape,
        shape: Vec<usize>,
    ) -> Result<Tensor> {
        let (x, w) = (x.values::<F>()?, w.values::<F>()?);
        let bias = b.map(|b| b.values::<F>()).transpose()?;
        gemm_new(s, x, w, packed, bias, act, &shape)
    }
    if w.dtype() == DType::BF16 && matches!(x.dtype(), DType::F32 | DType::BF16) {
        let (s, shape) = linear_dims(x, w, b)?;
        let packing = match weight {
            WeightUse::Constant => gemm_weights::packed(w),
            WeightUse::Varying => PackedWeight::pack(w).map(Arc::new),
        };
        let Some(PackedWeight::Bf16(packed)) = packing.as_deref() else {
            unreachable!("a 2-D bf16 host weight always packs for the bf16 GEMM")
        };
        return linear_bf16(x, packed, b, act, s, &shape, DType::F32);
    }
    let (s, shape) = linear_shape(x, w, b)?;
    let packing = match weight {
        WeightUse::Constant if x.dtype() == DType::F32 && s.m <= PACK_ONCE_MAX_ROWS => {
            gemm_weights::packed(w)
        }
        WeightUse::Constant if x.dtype() == DType::F32 => gemm_weights::cached(w),
        _ => None,
    };
    let packed = match packing.as_deref() {
        Some(PackedWeight::F32(p)) => Some(p),
        _ => None,
    };
    dispatch_float!("linear", x.dtype(), run(x, w, packed, b, act, s, shape))
}

/// The values of `x` (F32 or BF16) as a bf16 GEMM's activation operand.
fn bf16_input<'a>(op: &'static str, x: &'a Tensor) -> Result<Bf16Input<'a>> {
    match x.dtype() {
        DType::F32 => Ok(Bf16Input::F32(x.values()?)),
        DType::BF16 => Ok(Bf16Input::Bf16(x.values()?)),
        other => Err(TensorError::shape(
            op,
            format!("a bf16 GEMM takes an F32 or BF16 input, got {other:?}"),
        )),
    }
}

/// [`linear`] on the bf16 GEMM, `packed` for it: `x` F32 or BF16, the output `output` (F32 or
/// BF16).
fn linear_bf16(
    x: &Tensor,
    packed: &PackedBf16Weight,
    b: Option<&Tensor>,
    act: Activation,
    s: GemmShape,
    shape: &[usize],
    output: DType,
) -> Result<Tensor> {
    if let Some(b) = b.filter(|b| b.dtype() != DType::F32) {
        return Err(TensorError::shape(
            "linear",
            format!("a bf16 GEMM takes an F32 bias, got {:?}", b.dtype()),
        ));
    }
    let x = bf16_input("linear", x)?;
    let bias = b.map(|b| b.values::<f32>()).transpose()?;
    fn run<T: Element>(
        len: usize,
        shape: &[usize],
        gemm: impl FnOnce(&mut [MaybeUninit<T>]),
    ) -> Result<Tensor> {
        let mut out = Vec::with_capacity(len);
        gemm(&mut out.spare_capacity_mut()[..len]);
        // SAFETY: `gemm_bf16_into_uninit` initialised all `len` elements.
        unsafe { out.set_len(len) };
        Tensor::from_vec(shape, out)
    }
    let gemm =
        |out: Bf16Output<'_>| cpu::gemm_bf16::gemm_bf16_into_uninit(x, s.m, packed, bias, act, out);
    match output {
        DType::F32 => run(s.m * s.n, shape, |out| gemm(Bf16Output::F32(out))),
        DType::BF16 => run(s.m * s.n, shape, |out| gemm(Bf16Output::Bf16(out))),
        other => unreachable!("a bf16 GEMM stores F32 or BF16, not {other:?}"),
    }
}

/// `act(x·Wᵀ + b)` on the bf16 GEMM with its output rounded to bf16 as the kernel stores it:
/// the input of a following bf16 GEMM, which would round it there (the same bits, in half the
/// bytes, and no pass of its own). Inference: `w` is a constant host weight, F32 (its bf16
/// packing kept, as [`linear_bf16_compute`] keeps it) or BF16; `x` is F32 or BF16, `b` F32.
pub fn linear_bf16_rounded(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
) -> Result<Tensor> {
    if !(x.is_host() && w.is_host() && b.is_none_or(Tensor::is_host)) {
        return Err(TensorError::shape(
            "linear",
            "the bf16 GEMM runs on the CPU only",
        ));
    }
    let packing = match w.dtype() {
        DType::F32 => gemm_weights::packed_bf16(w, false),
        DType::BF16 => gemm_weights::packed(w),
        other => {
            return Err(TensorError::shape(
                "linear",
                format!("the bf16 GEMM takes an F32 or BF16 weight, got {other:?}"),
            ))
        }
    };
    let (s, shape) = linear_dims(x, w, b)?;
    let packed = packing
        .as_deref()
        .and_then(PackedWeight::bf16_forward)
        .expect("a 2-D F32 or BF16 host weight always packs for the bf16 GEMM");
    linear_bf16(x, packed, b, act, s, &shape, DType::BF16)
}

/// `x` (F32) rounded to bf16, to nearest even ([`cpu::gemm_bf16::round_into`]): one rounding
/// of an input that several bf16 GEMMs read.
pub fn round_to_bf16(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.is_host() {
        return Err(TensorError::shape(
            "round_to_bf16",
            format!("takes an F32 host tensor, got {:?}", x.dtype()),
        ));
    }
    Tensor::from_vec(x.shape(), cpu::gemm_bf16::rounded(x.values()?))
}

/// [`linear`] on the bf16 GEMM whatever the weight's dtype (`f32` or `bf16`): mixed-precision
/// compute. `x` (F32, or BF16 rounded already) is rounded to bf16 at the GEMM's input, `w` once
/// per packing ([`gemm_weights::packed_bf16`]), products accumulate in f32, and the bias and
/// output are f32.
/// The packing is kept while `w`'s storage lives; an optimiser step moves a trained weight to
/// new storage, so its bf16 copy is made again on the first call after each step. With
/// `training` the packing also holds `W` for [`linear_bf16_input_grad`], and is returned for it.
pub fn linear_bf16_compute(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Activation,
    training: bool,
) -> Result<(Tensor, Arc<PackedWeight>)> {
    if !(x.is_host() && w.is_host() && b.is_none_or(Tensor::is_host)) {
        return Err(TensorError::shape(
            "linear",
            "bf16 compute of an f32 weight runs on the CPU only",
        ));
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16)
        || !matches!(w.dtype(), DType::F32 | DType::BF16)
    {
        return Err(TensorError::shape(
            "linear",
            format!(
                "bf16 compute takes an F32 or BF16 input and an F32 or BF16 weight, got {:?} \
                 and {:?}",
                x.dtype(),
                w.dtype()
            ),
        ));
    }
    let (s, shape) = linear_dims(x, w, b)?;
    let packing = gemm_weights::packed_bf16(w, training)
        .expect("a 2-D F32 or BF16 host weight always packs for the bf16 GEMM");
    let forward = packing.bf16_forward().expect("a bf16 packing");
    let y = linear_bf16(x, forward, b, act, s, &shape, DType::F32)?;
    Ok((y, packing))
}

/// `dX = dY·W` of a [`linear_bf16_compute`] in training: `dY` (`[..., out]`, f32) rounded to
/// bf16, `W` from the packing's input-gradient half, f32 accumulation and output (`x_shape`).
pub fn linear_bf16_input_grad(
    dy: &Tensor,
    packing: &PackedWeight,
    x_shape: &[usize],
) -> Result<Tensor> {
    let PackedWeight::Bf16Training { input_grad, .. } = packing else {
        return Err(TensorError::shape(
            "linear_backward",
            "the weight was not packed for a bf16 input gradient",
        ));
    };
    let (in_f, out_f) = input_grad.shape();
    if dy.rank() == 0 || dy.dim(-1) != out_f || x_shape.last() != Some(&in_f) {
        return Err(TensorError::shape(
            "linear_backward",
            format!(
                "gradient {:?} against a weight of {out_f} outputs and input {x_shape:?}",
                dy.shape()
            ),
        ));
    }
    let rows = dy.numel() / out_f;
    let s = GemmShape {
        m: rows,
        n: in_f,
        k: out_f,
        trans_a: false,
        trans_b: true,
    };
    if x_shape.iter().product::<usize>() != rows * in_f {
        return Err(TensorError::shape(
            "linear_backward",
            format!("gradient {:?} against input {x_shape:?}", dy.shape()),
        ));
    }
    linear_bf16(
        dy,
        input_grad,
        None,
        Activation::Identity,
        s,
        x_shape,
        DType::F32,
    )
}

/// The weight and bias gradients of a [`linear_bf16_compute`] in training: `dW = dYᵀ·X` on the
/// bf16 GEMM (`dY` and `x` rounded to bf16, f32 accumulation; only if `need_dw`) and
/// `db = Σ_rows dY` in f32. `x` is F32 or BF16 (rounded already: the same bits), `dy` F32.
pub fn linear_bf16_param_grads(
    x: &Tensor,
    dy: &Tensor,
    need_dw: bool,
) -> Result<(Option<Tensor>, Tensor)> {
    let xv = bf16_input("linear_backward", x)?;
    if dy.dtype() != DType::F32 || x.rank() == 0 || dy.rank() == 0 {
        return Err(TensorError::shape(
            "linear_backward",
            format!(
                "bf16 weight gradients take an F32 dy and inputs of rank ≥ 1, got {:?} {:?} and \
                 x {:?}",
                dy.dtype(),
                dy.shape(),
                x.shape()
            ),
        ));
    }
    let (in_f, out_f) = (x.dim(-1), dy.dim(-1));
    let rows = x.numel() / in_f.max(1);
    if dy.numel() != rows * out_f {
        return Err(TensorError::shape(
            "linear_backward",
            format!("gradient {:?} against input {:?}", dy.shape(), x.shape()),
        ));
    }
    let dyv = dy.values::<f32>()?;
    let mut db = vec![0.0f32; out_f];
    let dw = if need_dw {
        let mut out = Vec::with_capacity(out_f * in_f);
        let uninit = &mut out.spare_capacity_mut()[..out_f * in_f];
        // db = Σ_rows dY comes with the product (on AMX, from the pass that converts dY).
        let path = Bf16Path::best();
        cpu::gemm_bf16::gemm_bf16_at_b(path, dyv, xv, out_f, in_f, rows, uninit, Some(&mut db));
        // SAFETY: `gemm_bf16_at_b` initialised all out_f·in_f elements.
        unsafe { out.set_len(out_f * in_f) };
        Some(Tensor::from_vec(&[out_f, in_f], out)?)
    } else {
        cpu::elementwise::bias_backward(out_f, dyv, &mut db);
        None
    };
    Ok((dw, Tensor::from_vec(&[out_f], db)?))
}

/// Checks [`linear`]'s operands for one dtype: the product `x·Wᵀ` over all rows of `x`, and the
/// result's shape.
pub fn linear_shape(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(GemmShape, Vec<usize>)> {
    same_dtype("linear", &[x, w])?;
    if let Some(b) = b {
        same_dtype("linear", &[x, b])?;
    }
    linear_dims(x, w, b)
}

/// [`linear_shape`] without the dtypes.
fn linear_dims(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(GemmShape, Vec<usize>)> {
    if w.rank() != 2 || x.rank() == 0 || x.dim(-1) != w.dim(1) {
        return Err(TensorError::shape(
            "linear",
            format!("input {:?} against weight {:?}", x.shape(), w.shape()),
        ));
    }
    let (out_f, in_f) = (w.dim(0), w.dim(1));
    if let Some(b) = b {
        expect_shape("linear", "bias", b, &[out_f])?;
    }
    let rows = x.numel() / in_f;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = out_f;
    let s = GemmShape {
        m: rows,
        n: out_f,
        k: in_f,
        trans_a: false,
        trans_b: true,
    };
    Ok((s, shape))
}

/// Elementwise GELU (erf form).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(x: &Tensor) -> Result<Tensor> {
        let values = x.values::<F>()?;
        let mut y = Vec::with_capacity(values.len());
        cpu::activation::gelu_forward_into(values, &mut y.spare_capacity_mut()[..values.len()]);
        // SAFETY: `gelu_forward_into` initialised every element.
        unsafe { y.set_len(values.len()) };
        Tensor::from_vec(x.shape(), y)
    }
    dispatch_float!("gelu", x.dtype(), run(x))
}

/// `gelu(x)` of an F32 host tensor, rounded to bf16 as it is stored
/// ([`cpu::activation::gelu_forward_into_bf16`]): a bf16 GEMM's input, made once.
pub fn gelu_to_bf16(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.is_host() {
        return Err(TensorError::shape(
            "gelu_to_bf16",
            format!("takes an F32 host tensor, got {:?}", x.dtype()),
        ));
    }
    let values = x.values::<f32>()?;
    let mut y = Vec::with_capacity(values.len());
    cpu::activation::gelu_forward_into_bf16(values, &mut y.spare_capacity_mut()[..values.len()]);
    // SAFETY: `gelu_forward_into_bf16` initialised every element.
    unsafe { y.set_len(values.len()) };
    Tensor::from_vec(x.shape(), y)
}

/// `x ← gelu(x)`: no second buffer (inference).
pub fn gelu_in_place(x: &mut Tensor) -> Result<()> {
    fn run<F: Float>(x: &mut Tensor) -> Result<()> {
        cpu::activation::gelu_forward(x.values_mut::<F>()?);
        Ok(())
    }
    dispatch_float!("gelu", x.dtype(), run(x))
}

/// Inverted dropout: `x` times the counter-based mask of `(p, seed)` (`cpu::dropout`).
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    fn run<F: Float>(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
        let mut y = x.clone();
        cpu::dropout::dropout(y.values_mut::<F>()?, p, seed);
        Ok(y)
    }
    dispatch_float!("dropout", x.dtype(), run(x, p, seed))
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(x: &Tensor) -> Result<Tensor> {
        let mut y = Tensor::zeros(x.shape(), F::DTYPE);
        cpu::softmax::softmax_forward(x.dim(-1), x.values::<F>()?, y.values_mut::<F>()?);
        Ok(y)
    }
    if x.rank() == 0 {
        return Err(TensorError::shape("softmax", "scalar input"));
    }
    dispatch_float!("softmax", x.dtype(), run(x))
}

/// LayerNorm over the last dimension. Returns `(y, mean, rstd)`; the statistics are `[rows]`.
pub fn layernorm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    fn run<F: Float>(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        s: LayerNormShape,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut y = Tensor::zeros(x.shape(), F::DTYPE);
        let mut mean = Tensor::zeros(&[s.rows], F::DTYPE);
        let mut rstd = Tensor::zeros(&[s.rows], F::DTYPE);
        cpu::layernorm::layernorm_forward(
            &s,
            x.values::<F>()?,
            gamma.values::<F>()?,
            beta.values::<F>()?,
            y.values_mut::<F>()?,
            mean.values_mut::<F>()?,
            rstd.values_mut::<F>()?,
        );
        Ok((y, mean, rstd))
    }
    let dtype = same_dtype("layernorm", &[x, gamma, beta])?;
    let cols = if x.rank() == 0 { 0 } else { x.dim(-1) };
    expect_shape("layernorm", "gamma", gamma, &[cols])?;
    expect_shape("layernorm", "beta", beta, &[cols])?;
    let s = LayerNormShape {
        rows: x.numel() / cols.max(1),
        cols,
        eps,
    };
    dispatch_float!("layernorm", dtype, run(x, gamma, beta, s))
}

/// Gathers rows of `table` (`[vocab, dim]`) for each id. Out-of-range ids are an error.
pub fn embedding(table: &Tensor, ids: &[usize]) -> Result<Tensor> {
    fn run<F: Float>(table: &Tensor, ids: &[usize]) -> Result<Tensor> {
        let dim = table.dim(1);
        let mut out = Tensor::zeros(&[ids.len(), dim], F::DTYPE);
        cpu::embedding::embedding_forward(dim, table.values::<F>()?, ids, out.values_mut::<F>()?);
        Ok(out)
    }
    if table.rank() != 2 {
        return Err(TensorError::shape(
            "embedding",
            format!("table must be [vocab, dim], got {:?}", table.shape()),
        ));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i >= table.dim(0)) {
        return Err(TensorError::shape(
            "embedding",
            format!("id {bad} is outside the table of {} rows", table.dim(0)),
        ));
    }
    dispatch_float!("embedding", table.dtype(), run(table, ids))
}

/// `a + b` for tensors of identical shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut out = Tensor::zeros(a.shape(), F::DTYPE);
        cpu::elementwise::add(a.values::<F>()?, b.values::<F>()?, out.values_mut::<F>()?);
        Ok(out)
    }
    let dtype = same_dtype("add", &[a, b])?;
    expect_shape("add", "right operand", b, a.shape())?;
    dispatch_float!("add", dtype, run(a, b))
}

/// `acc += x` for tensors of identical shape, in `acc`'s storage (copied first only if shared):
/// accumulating a gradient without a third buffer.
pub fn add_assign(acc: &mut Tensor, x: &Tensor) -> Result<()> {
    fn run<F: Float>(acc: &mut Tensor, x: &Tensor) -> Result<()> {
        // A multiply-add by exactly 1 rounds once, as `a + b` does: the same bits as [`add`].
        cpu::elementwise::axpy(F::from_usize(1), x.values::<F>()?, acc.values_mut::<F>()?);
        Ok(())
    }
    let dtype = same_dtype("add", &[acc, x])?;
    expect_shape("add", "right operand", x, acc.shape())?;
    dispatch_float!("add", dtype, run(acc, x))
}

/// `Σ x²` over every element of `x`, accumulated in f64.
pub fn sum_of_squares(x: &Tensor) -> Result<f64> {
    fn run<F: Float>(x: &Tensor) -> Result<f64> {
        Ok(cpu::elementwise::sum_of_squares(x.values::<F>()?))
    }
    dispatch_float!("sum_of_squares", x.dtype(), run(x))
}

/// `alpha·x`.
pub fn scale(x: &Tensor, alpha: f64) -> Result<Tensor> {
    fn run<F: Float>(x: &Tensor, alpha: f64) -> Result<Tensor> {
        let mut y = x.clone();
        cpu::elementwise::scale(F::from_f64(alpha), y.values_mut::<F>()?);
        Ok(y)
    }
    dispatch_float!("scale", x.dtype(), run(x, alpha))
}

/// Fused multi-head attention; `q`, `k`, `v` are `[batch, seq, heads·head_dim]`, `mask` is
/// `[batch, seq]` (1 = token, 0 = padding). Returns `(out, lse)` with `lse` `[batch, heads, seq]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
) -> Result<(Tensor, Tensor)> {
    fn run<F: Float>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        s: AttentionShape,
    ) -> Result<(Tensor, Tensor)> {
        attention_into::<F>(q, k, v, mask, s, |q, k, v, mask, out, lse| {
            cpu::attention::attention_forward(&s, q, k, v, mask, out, lse)
        })
    }
    let s = attention_shape(q, k, v, mask, heads)?;
    dispatch_float!("attention", q.dtype(), run(q, k, v, mask, s))
}

/// [`attention`] with both products (`q·kᵀ` and `P·v`) in bf16 with f32 accumulation, on the
/// CPU's best bf16 path; the softmax, `lse` and the output stay f32. The operands are F32 host
/// tensors; [`attention_backward_bf16`] is its backward.
pub fn attention_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
) -> Result<(Tensor, Tensor)> {
    let s = attention_shape(q, k, v, mask, heads)?;
    bf16_attention_operand(q)?;
    attention_into::<f32>(q, k, v, mask, s, |q, k, v, mask, out, lse| {
        cpu::attention::attention_forward_bf16(Bf16Path::best(), &s, q, k, v, mask, out, lse)
    })
}

/// Bf16 attention takes F32 host operands (the others are checked to match `q`).
fn bf16_attention_operand(q: &Tensor) -> Result<()> {
    if q.dtype() != DType::F32 || !q.is_host() {
        return Err(TensorError::shape(
            "attention",
            format!("bf16 products take F32 host operands, got {q:?}"),
        ));
    }
    Ok(())
}

/// The output (`q`'s shape) and `lse` (`[batch, heads, seq]`) of an attention forward, filled by
/// `kernel(q, k, v, mask, out, lse)` over the operands' values.
fn attention_into<F: Float>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    s: AttentionShape,
    kernel: impl FnOnce(&[F], &[F], &[F], &[F], &mut [F], &mut [F]),
) -> Result<(Tensor, Tensor)> {
    let mut out = Tensor::zeros(q.shape(), F::DTYPE);
    let mut lse = Tensor::zeros(&[s.batch, s.heads, s.seq], F::DTYPE);
    kernel(
        q.values::<F>()?,
        k.values::<F>()?,
        v.values::<F>()?,
        mask.values::<F>()?,
        out.values_mut::<F>()?,
        lse.values_mut::<F>()?,
    );
    Ok((out, lse))
}

/// Validates attention operands and derives the shape.
pub fn attention_shape(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
) -> Result<AttentionShape> {
    same_dtype("attention", &[q, k, v, mask])?;
    if q.rank() != 3 || heads == 0 || !q.dim(2).is_multiple_of(heads) {
        return Err(TensorError::shape(
            "attention",
            format!("q {:?} cannot split into {heads} heads", q.shape()),
        ));
    }
    expect_shape("attention", "k", k, q.shape())?;
    expect_shape("attention", "v", v, q.shape())?;
    expect_shape("attention", "mask", mask, &q.shape()[..2])?;
    Ok(AttentionShape {
        batch: q.dim(0),
        seq: q.dim(1),
        heads,
        head_dim: q.dim(2) / heads,
    })
}

/// Mean over the unmasked tokens: `[batch, seq, dim]` × `[batch, seq]` → `[batch, dim]`.
pub fn mean_pool(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, d) = (x.dim(0), x.dim(1), x.dim(2));
        let mut out = Tensor::zeros(&[b, d], F::DTYPE);
        cpu::pooling::mean_pool_forward(
            s,
            d,
            x.values::<F>()?,
            mask.values::<F>()?,
            out.values_mut::<F>()?,
        );
        Ok(out)
    }
    let dtype = same_dtype("mean_pool", &[x, mask])?;
    if x.rank() != 3 {
        return Err(TensorError::shape(
            "mean_pool",
            format!("input must be [batch, seq, dim], got {:?}", x.shape()),
        ));
    }
    expect_shape("mean_pool", "mask", mask, &x.shape()[..2])?;
    dispatch_float!("mean_pool", dtype, run(x, mask))
}

/// Row-wise L2 normalisation over the last dimension. Returns `(y, norms)`.
pub fn l2_normalize(x: &Tensor) -> Result<(Tensor, Tensor)> {
    fn run<F: Float>(x: &Tensor) -> Result<(Tensor, Tensor)> {
        let dim = x.dim(-1);
        let mut y = Tensor::zeros(x.shape(), F::DTYPE);
        let mut norms = Tensor::zeros(&[x.numel() / dim.max(1)], F::DTYPE);
        cpu::pooling::l2_normalize_forward(
            dim,
            x.values::<F>()?,
            y.values_mut::<F>()?,
            norms.values_mut::<F>()?,
        );
        Ok((y, norms))
    }
    if x.rank() == 0 {
        return Err(TensorError::shape("l2_normalize", "scalar input"));
    }
    dispatch_float!("l2_normalize", x.dtype(), run(x))
}

// ---------------------------------------------------------------------------------------------
// Backward ops. Each takes what its forward saved plus the upstream gradient `dy` and returns
// freshly allocated input gradients.

/// `(dA, dB)` of `C = op(A)·op(B)` for 2-D or batched operands, shapes as in [`matmul`].
pub fn matmul_backward(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
    dc: &Tensor,
) -> Result<(Tensor, Tensor)> {
    // dA = dC·op(B)ᵀ (stored transposed back if A was), dB = op(A)ᵀ·dC likewise.
    let da = if trans_a {
        matmul(b, dc, trans_b, true)?
    } else {
        matmul(dc, b, false, !trans_b)?
    };
    let db = if trans_b {
        matmul(dc, a, true, trans_a)?
    } else {
        matmul(a, dc, !trans_a, false)?
    };
    Ok((da, db))
}

/// Gradients of [`linear`]: `dx = dy·W`, `dW = dyᵀ·x`, `db = Σ_rows dy`.
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    fn run<F: Float>(
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let (out_f, in_f) = (w.dim(0), w.dim(1));
        let rows = x.numel() / in_f;
        let (xv, wv, dyv) = (x.values::<F>()?, w.values::<F>()?, dy.values::<F>()?);
        // dX = dY·W
        let dxv = if need_dx {
            let s = GemmShape {
                m: rows,
                n: in_f,
                k: out_f,
                trans_a: false,
                trans_b: false,
            };
            Some(gemm_new(
                s,
                dyv,
                wv,
                None,
                None,
                Activation::Identity,
                x.shape(),
            )?)
        } else {
            None
        };
        // dW = dYᵀ·X
        let s = GemmShape {
            m: out_f,
            n: in_f,
            k: rows,
            trans_a: true,
            trans_b: false,
        };
        let dw = gemm_new(s, dyv, xv, None, None, Activation::Identity, w.shape())?;
        let mut db = Tensor::zeros(&[out_f], F::DTYPE);
        cpu::elementwise::bias_backward(out_f, dy.values::<F>()?, db.values_mut::<F>()?);
        Ok((dxv, dw, db))
    }
    same_dtype("linear_backward", &[x, w, dy])?;
    dispatch_float!("linear_backward", x.dtype(), run(x, w, dy, need_dx))
}

pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let shape = x.shape();
        let (x, dy) = (x.values::<F>()?, dy.values::<F>()?);
        let mut dx = Vec::with_capacity(x.len());
        cpu::activation::gelu_backward(x, dy, &mut dx.spare_capacity_mut()[..x.len()]);
        // SAFETY: `gelu_backward` initialised every element.
        unsafe { dx.set_len(x.len()) };
        Tensor::from_vec(shape, dx)
    }
    expect_shape("gelu_backward", "dy", dy, x.shape())?;
    dispatch_float!("gelu_backward", x.dtype(), run(x, dy))
}

/// `x ← LayerNorm(x + residual)` in place, keeping no statistics: a transformer block's residual
/// and normalisation at inference, in one pass over `x`.
pub fn add_layernorm_in_place(
    x: &mut Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<()> {
    fn run<F: Float>(
        x: &mut Tensor,
        residual: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        s: LayerNormShape,
    ) -> Result<()> {
        cpu::layernorm::add_layernorm_forward(
            &s,
            x.values_mut::<F>()?,
            residual.values::<F>()?,
            gamma.values::<F>()?,
            beta.values::<F>()?,
        );
        Ok(())
    }
    let dtype = same_dtype("add_layernorm", &[x, residual, gamma, beta])?;
    expect_shape("add_layernorm", "residual", residual, x.shape())?;
    let cols = if x.rank() == 0 { 0 } else { x.dim(-1) };
    expect_shape("add_layernorm", "gamma", gamma, &[cols])?;
    expect_shape("add_layernorm", "beta", beta, &[cols])?;
    let s = LayerNormShape {
        rows: x.numel() / cols.max(1),
        cols,
        eps,
    };
    dispatch_float!("add_layernorm", dtype, run(x, residual, gamma, beta, s))
}

/// `(dx, dgamma, dbeta)` of [`layernorm`] from its saved statistics.
pub fn layernorm_backward(
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    fn run<F: Float>(
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cols = gamma.numel();
        let s = LayerNormShape {
            rows: x.numel() / cols.max(1),
            cols,
            eps: 0.0,
        };
        let mut dx = Tensor::zeros(x.shape(), F::DTYPE);
        let mut dgamma = Tensor::zeros(gamma.shape(), F::DTYPE);
        let mut dbeta = Tensor::zeros(gamma.shape(), F::DTYPE);
        cpu::layernorm::layernorm_backward(
            &s,
            x.values::<F>()?,
            gamma.values::<F>()?,
            mean.values::<F>()?,
            rstd.values::<F>()?,
            dy.values::<F>()?,
            dx.values_mut::<F>()?,
            dgamma.values_mut::<F>()?,
            dbeta.values_mut::<F>()?,
        );
        Ok((dx, dgamma, dbeta))
    }
    expect_shape("layernorm_backward", "dy", dy, x.shape())?;
    dispatch_float!(
        "layernorm_backward",
        x.dtype(),
        run(x, gamma, mean, rstd, dy)
    )
}

/// `(dq, dk, dv)` of [`attention`], recomputing probabilities from the saved `lse`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    fn run<F: Float>(
        s: AttentionShape,
        operands: [&Tensor; 7],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        attention_backward_into::<F>(operands, |[q, k, v, mask, out, lse, dout], [dq, dk, dv]| {
            cpu::attention::attention_backward(&s, q, k, v, mask, out, lse, dout, dq, dk, dv)
        })
    }
    let s = attention_shape(q, k, v, mask, heads)?;
    expect_shape("attention_backward", "dout", dout, q.shape())?;
    let operands = [q, k, v, mask, out, lse, dout];
    dispatch_float!("attention_backward", q.dtype(), run(s, operands))
}

/// The backward of [`attention_bf16`]: `(dq, dk, dv)` with every product in bf16 (f32
/// accumulation) on the CPU's best bf16 path, the scores recomputed by the forward's own bf16
/// product. The operands are F32 host tensors.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    heads: usize,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = attention_shape(q, k, v, mask, heads)?;
    expect_shape("attention_backward", "dout", dout, q.shape())?;
    bf16_attention_operand(q)?;
    let operands = [q, k, v, mask, out, lse, dout];
    attention_backward_into::<f32>(operands, |[q, k, v, mask, out, lse, dout], [dq, dk, dv]| {
        let path = Bf16Path::best();
        cpu::attention::attention_backward_bf16(path, &s, q, k, v, mask, out, lse, dout, dq, dk, dv)
    })
}

/// `(dq, dk, dv)` (each `q`'s shape) of an attention backward over `[q, k, v, mask, out, lse,
/// dout]`, filled by `kernel` over the operands' values.
fn attention_backward_into<F: Float>(
    operands: [&Tensor; 7],
    kernel: impl FnOnce([&[F]; 7], [&mut [F]; 3]),
) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = operands[0].shape();
    let [mut dq, mut dk, mut dv] = [(); 3].map(|_| Tensor::zeros(shape, F::DTYPE));
    let values = [
        operands[0].values::<F>()?,
        operands[1].values::<F>()?,
        operands[2].values::<F>()?,
        operands[3].values::<F>()?,
        operands[4].values::<F>()?,
        operands[5].values::<F>()?,
        operands[6].values::<F>()?,
    ];
    kernel(
        values,
        [
            dq.values_mut::<F>()?,
            dk.values_mut::<F>()?,
            dv.values_mut::<F>()?,
        ],
    );
    Ok((dq, dk, dv))
}

/// Scatter-add of `dout` (`[ids.len(), dim]`) into a zero gradient of the `[vocab, dim]` table.
pub fn embedding_backward(table_shape: &[usize], ids: &[usize], dout: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(table_shape: &[usize], ids: &[usize], dout: &Tensor) -> Result<Tensor> {
        let mut dtable = Tensor::zeros(table_shape, F::DTYPE);
        cpu::embedding::embedding_backward(
            table_shape[1],
            ids,
            dout.values::<F>()?,
            dtable.values_mut::<F>()?,
        );
        Ok(dtable)
    }
    expect_shape(
        "embedding_backward",
        "dout",
        dout,
        &[ids.len(), table_shape[1]],
    )?;
    dispatch_float!(
        "embedding_backward",
        dout.dtype(),
        run(table_shape, ids, dout)
    )
}

pub fn mean_pool_backward(mask: &Tensor, x_shape: &[usize], dout: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(mask: &Tensor, x_shape: &[usize], dout: &Tensor) -> Result<Tensor> {
        let mut dx = Tensor::zeros(x_shape, F::DTYPE);
        cpu::pooling::mean_pool_backward(
            x_shape[1],
            x_shape[2],
            mask.values::<F>()?,
            dout.values::<F>()?,
            dx.values_mut::<F>()?,
        );
        Ok(dx)
    }
    expect_shape(
        "mean_pool_backward",
        "dout",
        dout,
        &[x_shape[0], x_shape[2]],
    )?;
    dispatch_float!("mean_pool_backward", dout.dtype(), run(mask, x_shape, dout))
}

pub fn l2_normalize_backward(y: &Tensor, norms: &Tensor, dy: &Tensor) -> Result<Tensor> {
    fn run<F: Float>(y: &Tensor, norms: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let mut dx = Tensor::zeros(y.shape(), F::DTYPE);
        cpu::pooling::l2_normalize_backward(
            y.dim(-1),
            y.values::<F>()?,
            norms.values::<F>()?,
            dy.values::<F>()?,
            dx.values_mut::<F>()?,
        );
        Ok(dx)
    }
    expect_shape("l2_normalize_backward", "dy", dy, y.shape())?;
    dispatch_float!("l2_normalize_backward", y.dtype(), run(y, norms, dy))
}

/// Mean softmax cross-entropy of `logits` `[rows, classes]` against class indices.
/// Returns `(loss, probs)`; `probs` is what the backward needs.
pub fn cross_entropy(logits: &Tensor, targets: &[usize]) -> Result<(f64, Tensor)> {
    fn run<F: Float>(logits: &Tensor, targets: &[usize]) -> Result<(f64, Tensor)> {
        let mut probs = Tensor::zeros(logits.shape(), F::DTYPE);
        let loss = cpu::softmax::cross_entropy_forward(
            logits.dim(1),
            logits.values::<F>()?,
            targets,
            probs.values_mut::<F>()?,
        );
        Ok((loss.to_f64(), probs))
    }
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
    if let Some(&bad) = targets.iter().find(|&&t| t >= logits.dim(1)) {
        return Err(TensorError::shape(
            "cross_entropy",
            format!("target class {bad} but only {} classes", logits.dim(1)),
        ));
    }
    dispatch_float!("cross_entropy", logits.dtype(), run(logits, targets))
}

pub fn cross_entropy_backward(probs: &Tensor, targets: &[usize], dloss: f64) -> Result<Tensor> {
    fn run<F: Float>(probs: &Tensor, targets: &[usize], dloss: f64) -> Result<Tensor> {
        let mut d = Tensor::zeros(probs.shape(), F::DTYPE);
        cpu::softmax::cross_entropy_backward(
            probs.dim(1),
            probs.values::<F>()?,
            targets,
            F::from_f64(dloss),
            d.values_mut::<F>()?,
        );
        Ok(d)
    }
    dispatch_float!(
        "cross_entropy_backward",
        probs.dtype(),
        run(probs, targets, dloss)
    )
}

/// Distillation of per-row distributions at `temperature`: `(Σ_rows KL(q ‖ p), p − q)` with
/// `q = softmax(teacher/T)` and `p = softmax(student/T)`, both `[rows, classes]`.
pub fn kl_divergence(
    student: &Tensor,
    teacher: &Tensor,
    temperature: f64,
) -> Result<(f64, Tensor)> {
    fn run<F: Float>(
        student: &Tensor,
        teacher: &Tensor,
        temperature: f64,
    ) -> Result<(f64, Tensor)> {
        let mut diff = Tensor::zeros(student.shape(), F::DTYPE);
        let kl = cpu::softmax::kl_divergence_forward(
            student.dim(1),
            F::from_f64(temperature),
            student.values::<F>()?,
            teacher.values::<F>()?,
            diff.values_mut::<F>()?,
        );
        Ok((kl, diff))
    }
    if student.rank() != 2 || student.shape() != teacher.shape() || student.numel() == 0 {
        return Err(TensorError::shape(
            "kl_divergence",
            format!(
                "student {:?} against teacher {:?}",
                student.shape(),
                teacher.shape()
            ),
        ));
    }
    if student.dtype() != teacher.dtype() {
        return Err(TensorError::shape(
            "kl_divergence",
            format!(
                "student {:?} against teacher {:?}",
                student.dtype(),
                teacher.dtype()
            ),
        ));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(TensorError::shape(
            "kl_divergence",
            format!("temperature {temperature} is not a positive number"),
        ));
    }
    dispatch_float!(
        "kl_divergence",
        student.dtype(),
        run(student, teacher, temperature)
    )
}

/// Sum of all elements, accumulated in f64.
pub fn sum(x: &Tensor) -> Result<f64> {
    fn run<F: Float>(x: &Tensor) -> Result<f64> {
        Ok(x.values::<F>()?.iter().map(|v| v.to_f64()).sum())
    }
    dispatch_float!("sum", x.dtype(), run(x))
}
