use scalpel_tensor::{ops as tops, Tensor, TensorError};

use crate::device::backend_of;
use crate::ops::add;
use crate::ops::elementwise::sum_of;
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
        Some(be) => {
            let out = be.layernorm(xt, None, gt, bt, eps)?;
            (out.y, out.mean, out.rstd)
        }
        None => tops::layernorm(xt, gt, bt, eps)?,
    };
    Ok(Var::from_op(
        y,
        LayerNorm { mean, rstd },
        vec![x.clone(), gamma.clone(), beta.clone()],
    ))
}

/// `LayerNorm(x + residual)`, consuming `x`: a transformer block's residual connection and
/// normalisation. On a device one kernel adds and normalises, returning the sum it normalised,
/// which is recorded as [`add`]'s result, so the gradients are those of the composition. On the
/// host, when nothing needs a gradient and `x` is a constant nothing else holds (inference), the
/// sum and the normalisation are one in-place pass over `x`'s storage; otherwise this is
/// [`layernorm`] of [`add`].
pub fn add_layernorm(x: Var, residual: &Var, gamma: &Var, beta: &Var, eps: f64) -> Result<Var> {
    let tensors = [x.value(), residual.value(), gamma.value(), beta.value()];
    if let Some(be) = backend_of("add_layernorm", &tensors)? {
        let (xt, rt, gt, bt) = (x.value(), residual.value(), gamma.value(), beta.value());
        let out = be.layernorm(xt, Some(rt), gt, bt, eps)?;
        let Some(sum) = out.sum else {
            return Err(TensorError::Device(format!(
                "{}: add_layernorm returned no sum",
                be.name()
            ))
            .into());
        };
        let sum = sum_of(sum, x, residual.clone());
        let (mean, rstd) = (out.mean, out.rstd);
        return Ok(Var::from_op(
            out.y,
            LayerNorm { mean, rstd },
            vec![sum, gamma.clone(), beta.clone()],
        ));
    }
    let others = [residual, gamma, beta];
    let x = if others.iter().all(|v| !v.requires_grad()) {
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
