use std::sync::Arc;

use scalpel_tensor::cpu::gemm::Activation;
use scalpel_tensor::cpu::gemm_weights::PackedWeight;
use scalpel_tensor::ops::WeightUse;
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
use crate::ops::activation::gelu_of;
use crate::ops::gelu_in_place;
use crate::{Backward, Result, Var};

struct Linear {
    has_bias: bool,
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
        let (dx, dw, db) = match backend_of("linear backward", &[x, w, grad])? {
            Some(be) => be.linear_backward(x, w, grad, needs[0])?,
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
    let y = match backend_of("linear", &tensors)? {
        Some(be) => {
            be.linear(
                x.value(),
                w.value(),
                b.map(Var::value),
                Activation::Identity,
                false,
            )?
            .0
        }
        None => tops::linear(
            x.value(),
            w.value(),
            b.map(Var::value),
            Activation::Identity,
            weight_use(w),
        )?,
    };
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(b.cloned());
    Ok(Var::from_op(
        y,
        Linear {
            has_bias: b.is_some(),
        },
        inputs,
    ))
}

/// A weight that receives no gradient is a constant to the CPU GEMM, which may then keep it
/// packed.
fn weight_use(w: &Var) -> WeightUse {
    if w.requires_grad() {
        WeightUse::Varying
    } else {
        WeightUse::Constant
    }
}

/// `gelu(x·Wᵀ + b)`, a transformer's FFN up-projection, with the GELU applied by the GEMM as it
/// stores each tile (saving a pass over the block's largest activation) wherever that keeps the
/// gradients: at inference on the host (nothing needs a gradient), and on a device, whose GEMM
/// also stores the pre-activation the GELU's backward reads. Training on the host is
/// [`gelu_in_place`] of [`linear`].
pub fn linear_gelu(x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let mut tensors = vec![x.value(), w.value()];
    tensors.extend(b.map(Var::value));
    let constants = !x.requires_grad() && !w.requires_grad() && !b.is_some_and(Var::requires_grad);
    match backend_of("linear_gelu", &tensors)? {
        Some(be) => {
            let (xt, wt, bt) = (x.value(), w.value(), b.map(Var::value));
            let (y, pre) = be.linear(xt, wt, bt, Activation::Gelu, !constants)?;
            let Some(pre) = pre else {
                return Ok(Var::constant(y));
            };
            let mut inputs = vec![x.clone(), w.clone()];
            inputs.extend(b.cloned());
            let pre = Var::from_op(
                pre,
                Linear {
                    has_bias: b.is_some(),
                },
                inputs,
            );
            Ok(gelu_of(y, pre))
        }
        None if constants => {
            let y = tops::linear(
                x.value(),
                w.value(),
                b.map(Var::value),
                Activation::Gelu,
                WeightUse::Constant,
            )?;
            Ok(Var::constant(y))
        }
        None => gelu_in_place(linear(x, w, b)?),
    }
}

struct LinearBf16 {
    has_bias: bool,
    /// The bf16 packings of `W` the forward multiplied by, for `x·Wᵀ` and `dY·W`.
    packing: Arc<PackedWeight>,
}

impl Backward for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear (bf16)"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let x = inputs[0].value();
        let dx = match needs[0] {
            true => Some(tops::linear_bf16_input_grad(
                grad,
                &self.packing,
                x.shape(),
            )?),
            false => None,
        };
        let mut out = vec![dx];
        let (need_dw, need_db) = (needs[1], self.has_bias && needs[2]);
        if need_dw || need_db {
            let (dw, db) = tops::linear_bf16_param_grads(x, grad, need_dw)?;
            out.push(dw);
            if self.has_bias {
                out.push(need_db.then_some(db));
            }
        }
        Ok(out)
    }
}

/// [`linear`] with its three GEMMs in bf16 and f32 accumulation (mixed-precision training, CPU
/// only): `x·Wᵀ` and the input gradient `dY·W` round their activation operand to bf16 and
/// multiply by bf16 copies of the f32 (master) weight, packed once per weight value (made again
/// after each optimiser step, [`tops::linear_bf16_compute`]); the weight gradient `dYᵀ·X`
/// rounds both activations. Outputs, the bias and its gradient, and the weight gradient's
/// accumulation stay f32.
pub fn linear_bf16(x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let (xt, wt, bt) = (x.value(), w.value(), b.map(Var::value));
    let training = x.requires_grad();
    let (y, packing) = tops::linear_bf16_compute(xt, wt, bt, Activation::Identity, training)?;
    let mut inputs = vec![x.clone(), w.clone()];
    inputs.extend(b.cloned());
    Ok(Var::from_op(
        y,
        LinearBf16 {
            has_bias: b.is_some(),
            packing,
        },
        inputs,
    ))
}

/// `gelu(x·Wᵀ + b)` on the bf16 GEMM ([`linear_bf16`]) with its output rounded to bf16, for
/// a next op that is a bf16 linear and would round it anyway: half the bytes, and that linear
/// and its weight gradient read it as it is, with the bits of rounding the f32 output each time.
/// Without gradients the GEMM stores it rounded ([`tops::linear_bf16_rounded`]); in training
/// the f32 pre-activation is kept for GELU's backward and the rounded GELU is made from it
/// ([`tops::gelu_to_bf16`]). Its gradient is f32.
pub fn linear_gelu_bf16_rounded(x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let constants = !x.requires_grad() && !w.requires_grad() && !b.is_some_and(Var::requires_grad);
    if constants {
        let (x, w, b) = (x.value(), w.value(), b.map(Var::value));
        return Ok(Var::constant(tops::linear_bf16_rounded(
            x,
            w,
            b,
            Activation::Gelu,
        )?));
    }
    let pre = linear_bf16(x, w, b)?;
    Ok(gelu_of(tops::gelu_to_bf16(pre.value())?, pre))
}

/// The backward of [`round_to_bf16`]: the gradient passes through unchanged (in f32), as it
/// does through the rounding a bf16 GEMM makes of its input.
struct RoundToBf16;

impl Backward for RoundToBf16 {
    fn name(&self) -> &'static str {
        "round_to_bf16"
    }

    fn backward(
        &self,
        _: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.clone())])
    }
}

/// `x` rounded to bf16 once ([`tops::round_to_bf16`]), for several bf16 linears that read it
/// (attention's query, key and value): each reads it as it is, with the bits of rounding `x`
/// itself, and their weight gradients read it too. The gradient reaching it passes to `x`
/// unchanged, as through a GEMM's own rounding of its input.
pub fn round_to_bf16(x: &Var) -> Result<Var> {
    let y = tops::round_to_bf16(x.value())?;
    Ok(Var::from_op(y, RoundToBf16, vec![x.clone()]))
}

struct MatMul {
    trans_a: bool,
    trans_b: bool,
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
        let (da, db) = match backend_of("matmul backward", &[a, b, grad])? {
            // As tops::matmul_backward: dA = dC·op(B)ᵀ, dB = op(A)ᵀ·dC, stored transposed back
            // where the operand was.
            Some(be) => {
                let da = if ta {
                    be.matmul(b, grad, tb, true)?
                } else {
                    be.matmul(grad, b, false, !tb)?
                };
                let db = if tb {
                    be.matmul(grad, a, true, ta)?
                } else {
                    be.matmul(a, grad, !ta, false)?
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
    let c = match backend_of("matmul", &[a.value(), b.value()])? {
        Some(be) => be.matmul(a.value(), b.value(), trans_a, trans_b)?,
        None => tops::matmul(a.value(), b.value(), trans_a, trans_b)?,
    };
    Ok(Var::from_op(
        c,
        MatMul { trans_a, trans_b },
        vec![a.clone(), b.clone()],
    ))
}
