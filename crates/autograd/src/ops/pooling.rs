use scalpel_tensor::{ops as tops, Tensor};

use crate::{Backward, Result, Var};

struct MeanPool;

impl Backward for MeanPool {
    fn name(&self) -> &'static str {
        "mean_pool"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![
            Some(tops::mean_pool_backward(
                inputs[1].value(),
                inputs[0].shape(),
                grad,
            )?),
            None,
        ])
    }
}

/// Mean over unmasked tokens: `[batch, seq, dim]`, constant mask `[batch, seq]` → `[batch, dim]`.
pub fn mean_pool(x: &Var, mask: &Var) -> Result<Var> {
    Ok(Var::from_op(
        tops::mean_pool(x.value(), mask.value())?,
        MeanPool,
        vec![x.clone(), mask.clone()],
    ))
}

struct L2Normalize {
    norms: Tensor,
}

impl Backward for L2Normalize {
    fn name(&self) -> &'static str {
        "l2_normalize"
    }

    fn backward(
        &self,
        _: &[Var],
        out: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(tops::l2_normalize_backward(
            out,
            &self.norms,
            grad,
        )?)])
    }
}

/// Each row divided by its L2 norm (clamped below at 1e-12, as PyTorch's `F.normalize`).
pub fn l2_normalize(x: &Var) -> Result<Var> {
    let (y, norms) = tops::l2_normalize(x.value())?;
    Ok(Var::from_op(y, L2Normalize { norms }, vec![x.clone()]))
}
