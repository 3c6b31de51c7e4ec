use scalpel_tensor::{decoder_ops as dops, Tensor};

use crate::device::backend_of;
use crate::{Backward, Result, Var};

struct RmsNorm {
    rstd: Tensor,
}

impl Backward for RmsNorm {
    fn name(&self) -> &'static str {
        "rmsnorm"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (x, w) = (inputs[0].value(), inputs[1].value());
        let (dx, dw) = match backend_of("rmsnorm backward", &[x, w, grad])? {
            Some(be) => be.rmsnorm_backward(x, w, &self.rstd, grad)?,
            None => dops::rmsnorm_backward(x, w, &self.rstd, grad)?,
        };
        Ok(vec![needs[0].then_some(dx), needs[1].then_some(dw)])
    }
}

/// RMSNorm over the last dimension with weight `w` (Llama's `LlamaRMSNorm`); saves `rstd`.
pub fn rmsnorm(x: &Var, w: &Var, eps: f64) -> Result<Var> {
    let (xt, wt) = (x.value(), w.value());
    let (y, rstd) = match backend_of("rmsnorm", &[xt, wt])? {
        Some(be) => be.rmsnorm(xt, wt, eps)?,
        None => dops::rmsnorm(xt, wt, eps)?,
    };
    Ok(Var::from_op(
        y,
        RmsNorm { rstd },
        vec![x.clone(), w.clone()],
    ))
}
