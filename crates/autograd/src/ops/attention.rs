use scalpel_tensor::{ops as tops, Tensor};

use crate::{Backward, Result, Var};

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
        let (dq, dk, dv) = tops::attention_backward(
            q.value(),
            k.value(),
            v.value(),
            mask.value(),
            self.heads,
            out,
            &self.lse,
            grad,
        )?;
        Ok(vec![
            needs[0].then_some(dq),
            needs[1].then_some(dk),
            needs[2].then_some(dv),
            None,
        ])
    }
}

/// Multi-head scaled dot-product attention with a key-padding mask, as one op:
/// `softmax(q·kᵀ/√d + mask)·v` per head. `q`, `k`, `v` are `[batch, seq, heads·d]`; `mask` is a
/// constant `[batch, seq]` of 1 (token) / 0 (padding). Only the per-row log-sum-exp is saved.
pub fn attention(q: &Var, k: &Var, v: &Var, mask: &Var, heads: usize) -> Result<Var> {
    let (out, lse) = tops::attention(q.value(), k.value(), v.value(), mask.value(), heads)?;
    Ok(Var::from_op(
        out,
        Attention { heads, lse },
        vec![q.clone(), k.clone(), v.clone(), mask.clone()],
    ))
}
