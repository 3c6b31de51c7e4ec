use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
use crate::{AutogradError, Backward, Result, Var};

struct Attention {
    heads: usize,
    lse: Tensor,
}

impl Backward for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn backward(
        &self,
        inputs: &[Var],
        out: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let [q, k, v, mask] = inputs else {
            unreachable!("attention has four inputs")
        };
        let (q, k, v, mask) = (q.value(), k.value(), v.value(), mask.value());
        let (heads, lse) = (self.heads, &self.lse);
        let (dq, dk, dv) = match backend_of("attention backward", &[q, k, v, mask, grad])? {
            Some(be) => {
                let s = tops::attention_shape(q, k, v, mask, heads)?;
                be.attention_backward(&s, q, k, v, mask, out, lse, grad)?
            }
            None => tops::attention_backward(q, k, v, mask, heads, out, lse, grad)?,
        };
        Ok(vec![
            needs[0].then_some(dq),
            needs[1].then_some(dk),
            needs[2].then_some(dv),
            None,
        ])
    }
}

/// [`attention`] with its two products in bf16 (f32 accumulation, softmax and output), on the
/// CPU: bf16 inference. It has no backward (one would have to recompute the same rounded
/// scores), so an input that wants a gradient is an error, never silently f32 or ungraded.
pub fn attention_bf16(q: &Var, k: &Var, v: &Var, mask: &Var, heads: usize) -> Result<Var> {
    if [q, k, v].iter().any(|x| x.requires_grad()) {
        return Err(AutogradError::Graph(
            "bf16 attention is for inference: its inputs must not require gradients".into(),
        ));
    }
    let (out, _) = tops::attention_bf16(q.value(), k.value(), v.value(), mask.value(), heads)?;
    Ok(Var::constant(out))
}

/// Multi-head scaled dot-product attention with a key-padding mask, as one op:
/// `softmax(q·kᵀ/√d + mask)·v` per head. `q`, `k`, `v` are `[batch, seq, heads·d]`; `mask` is a
/// constant `[batch, seq]` of 1 (token) / 0 (padding). Only the per-row log-sum-exp is saved.
pub fn attention(q: &Var, k: &Var, v: &Var, mask: &Var, heads: usize) -> Result<Var> {
    let (qt, kt, vt, mt) = (q.value(), k.value(), v.value(), mask.value());
    let (out, lse) = match backend_of("attention", &[qt, kt, vt, mt])? {
        Some(be) => be.attention(qt, kt, vt, mt, heads)?,
        None => tops::attention(qt, kt, vt, mt, heads)?,
    };
    Ok(Var::from_op(
        out,
        Attention { heads, lse },
        vec![q.clone(), k.clone(), v.clone(), mask.clone()],
    ))
}
