use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
use crate::{AutogradError, Backward, Result, Var};

struct Gelu;

impl Backward for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let x = inputs[0].value();
        let dx = match backend_of("gelu backward", &[x, grad])? {
            Some(be) => be.gelu_backward(x, grad)?,
            None => tops::gelu_backward(x, grad)?,
        };
        Ok(vec![Some(dx)])
    }
}

/// GELU, exact erf form.
pub fn gelu(x: &Var) -> Result<Var> {
    let y = match backend_of("gelu", &[x.value()])? {
        Some(be) => be.gelu(x.value())?,
        None => tops::gelu(x.value())?,
    };
    Ok(gelu_of(y, x.clone()))
}

/// `y = gelu(x)`, computed elsewhere (a GEMM's epilogue), recorded with GELU's backward.
pub(crate) fn gelu_of(y: Tensor, x: Var) -> Var {
    Var::from_op(y, Gelu, vec![x])
}

/// GELU that consumes `x`: when no gradient is needed and nothing else holds `x` (inference),
/// the result overwrites `x`'s storage instead of taking a second activation-sized buffer;
/// otherwise the same as [`gelu`], gradient included.
pub fn gelu_in_place(x: Var) -> Result<Var> {
    if !x.value().is_host() {
        return gelu(&x);
    }
    match x.into_unshared_constant() {
        Ok(mut value) => {
            tops::gelu_in_place(&mut value)?;
            Ok(Var::constant(value))
        }
        Err(x) => gelu(&x),
    }
}

/// `x` times the dropout mask of `(p, seed)`, where `x` is (the mask is the same everywhere).
fn apply_dropout(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    Ok(match backend_of("dropout", &[x])? {
        Some(be) => be.dropout(x, p, seed)?,
        None => tops::dropout(x, p, seed)?,
    })
}

struct Dropout {
    p: f64,
    seed: u64,
}

impl Backward for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn backward(
        &self,
        _: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(apply_dropout(grad, self.p, self.seed)?)])
    }
}

/// Inverted dropout with probability `p`; identity (and no node) when `p == 0`.
pub fn dropout(x: &Var, p: f64, seed: u64) -> Result<Var> {
    if !(0.0..1.0).contains(&p) {
        return Err(AutogradError::Graph(format!(
            "dropout probability {p} is outside [0, 1)"
        )));
    }
    if p == 0.0 || !x.value().dtype().is_float() {
        return Ok(x.clone());
    }
    let y = apply_dropout(x.value(), p, seed)?;
    Ok(Var::from_op(y, Dropout { p, seed }, vec![x.clone()]))
}
