use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
use crate::{Backward, Result, Var};

struct Attention {
    heads: usize,
    lse: Tensor,
    /// The products were bf16 ([`attention_bf16`]): so are the backward's.
    bf16: bool,
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
            _ if self.bf16 => tops::attention_backward_bf16(q, k, v, mask, heads, out, lse, grad)?,
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
/// CPU, and so are the backward's (the scores recomputed by the same bf16 product, `dS` and
/// the sums over query blocks in f32): bf16 inference and mixed-precision training.
pub fn attention_bf16(q: &Var, k: &Var, v: &Var, mask: &Var, heads: usize) -> Result<Var> {
    let (out, lse) = tops::attention_bf16(q.value(), k.value(), v.value(), mask.value(), heads)?;
    Ok(Var::from_op(
        out,
        Attention {
            heads,
            lse,
            bf16: true,
        },
        vec![q.clone(), k.clone(), v.clone(), mask.clone()],
    ))
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
        Attention {
            heads,
            lse,
            bf16: false,
        },
        vec![q.clone(), k.clone(), v.clone(), mask.clone()],
    ))
}
