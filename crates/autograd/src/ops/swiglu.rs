use scalpel_tensor::{decoder_ops as dops, Tensor};

use crate::device::backend_of;
use crate::{Backward, Result, Var};

struct SwiGlu;

impl Backward for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (gate, up) = (inputs[0].value(), inputs[1].value());
        let (dgate, dup) = match backend_of("swiglu backward", &[gate, up, grad])? {
            Some(be) => be.swiglu_backward(gate, up, grad)?,
            None => dops::swiglu_backward(gate, up, grad)?,
        };
        Ok(vec![needs[0].then_some(dgate), needs[1].then_some(dup)])
    }
}

/// Llama's gated MLP unit, `silu(gate)·up`, as one op.
pub fn swiglu(gate: &Var, up: &Var) -> Result<Var> {
    let (g, u) = (gate.value(), up.value());
    let y = match backend_of("swiglu", &[g, u])? {
        Some(be) => be.swiglu(g, u)?,
        None => dops::swiglu(g, u)?,
    };
    Ok(Var::from_op(y, SwiGlu, vec![gate.clone(), up.clone()]))
}
