use scalpel_tensor::{ops as tops, Tensor};

use crate::{Backward, Result, Var};

struct Add;

impl Backward for Add {
    fn name(&self) -> &'static str {
        "add"
    }

    fn backward(
        &self,
        _: &[Var],
        _: &Tensor,
        grad: &Tensor,
        needs: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(needs.iter().map(|&n| n.then(|| grad.clone())).collect())
    }
}

/// `a + b` (the residual connection).
pub fn add(a: &Var, b: &Var) -> Result<Var> {
    Ok(Var::from_op(
        tops::add(a.value(), b.value())?,
        Add,
        vec![a.clone(), b.clone()],
    ))
}

struct Scale(f64);

impl Backward for Scale {
    fn name(&self) -> &'static str {
        "scale"
    }

    fn backward(
        &self,
        _: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(tops::scale(grad, self.0)?)])
    }
}

/// `alpha·x`.
pub fn scale(x: &Var, alpha: f64) -> Result<Var> {
    Ok(Var::from_op(
        tops::scale(x.value(), alpha)?,
        Scale(alpha),
        vec![x.clone()],
    ))
}

struct Reshape;

impl Backward for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.clone().reshape(inputs[0].shape())?)])
    }
}

/// Same elements, new shape.
pub fn reshape(x: &Var, shape: &[usize]) -> Result<Var> {
    Ok(Var::from_op(
        x.value().clone().reshape(shape)?,
        Reshape,
        vec![x.clone()],
    ))
}
