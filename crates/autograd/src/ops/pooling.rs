use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
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
        let (x_shape, mask) = (inputs[0].shape(), inputs[1].value());
        let dx = match backend_of("mean_pool backward", &[mask, grad])? {
            Some(be) => be.mean_pool_backward(mask, x_shape, grad)?,
            None => tops::mean_pool_backward(mask, x_shape, grad)?,
        };
        Ok(vec![Some(dx), None])
    }
}

/// Mean over unmasked tokens: `[batch, seq, dim]`, constant mask `[batch, seq]` → `[batch, dim]`.
pub fn mean_pool(x: &Var, mask: &Var) -> Result<Var> {
    let (xt, mt) = (x.value(), mask.value());
    let y = match backend_of("mean_pool", &[xt, mt])? {
        Some(be) => be.mean_pool(xt, mt)?,
        None => tops::mean_pool(xt, mt)?,
    };
    Ok(Var::from_op(y, MeanPool, vec![x.clone(), mask.clone()]))
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
        let dx = match backend_of("l2_normalize backward", &[out, grad])? {
            Some(be) => be.l2_normalize_backward(out, &self.norms, grad)?,
            None => tops::l2_normalize_backward(out, &self.norms, grad)?,
        };
        Ok(vec![Some(dx)])
    }
}

/// Each row divided by its L2 norm (clamped below at 1e-12, as PyTorch's `F.normalize`).
pub fn l2_normalize(x: &Var) -> Result<Var> {
    let xt = x.value();
    let (y, norms) = match backend_of("l2_normalize", &[xt])? {
        Some(be) => be.l2_normalize(xt)?,
        None => tops::l2_normalize(xt)?,
    };
    Ok(Var::from_op(y, L2Normalize { norms }, vec![x.clone()]))
}
