use scalpel_tensor::{ops as tops, Tensor};

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
        let (dx, dw, db) = tops::linear_backward(x, w, grad, needs[0])?;
        let mut out = vec![dx, needs[1].then_some(dw)];
        if self.has_bias {
            out.push(needs[2].then_some(db));
        }
        Ok(out)
    }
}

/// `y = x·Wᵀ + b` over the last dimension (PyTorch's `nn.Linear`, `W` is `[out, in]`).
pub fn linear(x: &Var, w: &Var, b: Option<&Var>) -> Result<Var> {
    let y = tops::linear(x.value(), w.value(), b.map(Var::value))?;
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
        let (da, db) = tops::matmul_backward(
            inputs[0].value(),
            inputs[1].value(),
            self.trans_a,
            self.trans_b,
            grad,
        )?;
        Ok(vec![needs[0].then_some(da), needs[1].then_some(db)])
    }
}

/// Batched `op(a)·op(b)`.
pub fn matmul(a: &Var, b: &Var, trans_a: bool, trans_b: bool) -> Result<Var> {
    let c = tops::matmul(a.value(), b.value(), trans_a, trans_b)?;
    Ok(Var::from_op(
        c,
        MatMul { trans_a, trans_b },
        vec![a.clone(), b.clone()],
    ))
}
