use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
use crate::ops::add;
use crate::{Backward, Result, Var};

struct LayerNorm {
    mean: Tensor,
    rstd: Tensor,
}

impl Backward for LayerNorm {
    fn name(&self) -> &'static str {
        "layernorm"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, gamma) = (inputs[0].value(), inputs[1].value());
        let (mean, rstd) = (&self.mean, &self.rstd);
        let (dx, dgamma, dbeta) = match backend_of("layernorm backward", &[x, gamma, grad])? {
            Some(be) => be.layernorm_backward(x, gamma, mean, rstd, grad)?,
            None => tops::layernorm_backward(x, gamma, mean, rstd, grad)?,
        };
        Ok(vec![
            needs[0].then_some(dx),
            needs[1].then_some(dgamma),
            needs[2].then_some(dbeta),
        ])
    }
}

/// LayerNorm over the last dimension with affine `gamma`, `beta`.
pub fn layernorm(x: &Var, gamma: &Var, beta: &Var, eps: f64) -> Result<Var> {
    let (xt, gt, bt) = (x.value(), gamma.value(), beta.value());
    let (y, mean, rstd) = match backend_of("layernorm", &[xt, gt, bt])? {
        Some(be) => be.layernorm(xt, gt, bt, eps)?,
        None => tops::layernorm(xt, gt, bt, eps)?,
    };
    Ok(Var::from_op(
        y,
        LayerNorm { mean, rstd },
        vec![x.clone(), gamma.clone(), beta.clone()],
    ))
}

/// `LayerNorm(x + residual)`, consuming `x`: a transformer block's residual connection and
/// normalisation. When nothing needs a gradient, `x` is a constant nothing else holds and every
/// tensor is on the host (inference), the sum and the normalisation are one in-place pass over `x`'s
/// storage; otherwise this is [`layernorm`] of [`add`], gradients included.
pub fn add_layernorm(x: Var, residual: &Var, gamma: &Var, beta: &Var, eps: f64) -> Result<Var> {
    let others = [residual, gamma, beta];
    let tensors = [x.value(), residual.value(), gamma.value(), beta.value()];
    let fusable = others.iter().all(|v| !v.requires_grad())
        && backend_of("add_layernorm", &tensors)?.is_none();
    let x = if fusable {
        match x.into_unshared_constant() {
            Ok(mut value) => {
                let (r, g, b) = (residual.value(), gamma.value(), beta.value());
                tops::add_layernorm_in_place(&mut value, r, g, b, eps)?;
                return Ok(Var::constant(value));
            }
            Err(x) => x,
        }
    } else {
        x
    };
    layernorm(&add(&x, residual)?, gamma, beta, eps)
}
