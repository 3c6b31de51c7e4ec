use scalpel_tensor::{ops as tops, Tensor};

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
        let (dx, dgamma, dbeta) = tops::layernorm_backward(
            inputs[0].value(),
            inputs[1].value(),
            &self.mean,
            &self.rstd,
            grad,
        )?;
        Ok(vec![
            needs[0].then_some(dx),
            needs[1].then_some(dgamma),
            needs[2].then_some(dbeta),
        ])
    }
}

/// LayerNorm over the last dimension with affine `gamma`, `beta`.
pub fn layernorm(x: &Var, gamma: &Var, beta: &Var, eps: f64) -> Result<Var> {
    let (y, mean, rstd) = tops::layernorm(x.value(), gamma.value(), beta.value(), eps)?;
    Ok(Var::from_op(
        y,
        LayerNorm { mean, rstd },
        vec![x.clone(), gamma.clone(), beta.clone()],
    ))
}
