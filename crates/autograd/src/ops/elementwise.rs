use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
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
        add_tensors(a.value(), b.value())?,
        Add,
        vec![a.clone(), b.clone()],
    ))
}

/// `sum = a + b`, computed elsewhere (fused into a device LayerNorm), recorded with `add`'s
/// backward.
pub(crate) fn sum_of(sum: Tensor, a: Var, b: Var) -> Var {
    Var::from_op(sum, Add, vec![a, b])
}

/// `a + b` where the tensors are (also the accumulation of a variable's gradients).
pub(crate) fn add_tensors(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(match backend_of("add", &[a, b])? {
        Some(be) => be.add(a, b)?,
        None => tops::add(a, b)?,
    })
}

/// `acc + g`, a variable's gradients summed: on the host in `acc`'s own buffer.
pub(crate) fn accumulate(mut acc: Tensor, g: &Tensor) -> Result<Tensor> {
    if backend_of("add", &[&acc, g])?.is_some() {
        return add_tensors(&acc, g);
    }
    tops::add_assign(&mut acc, g)?;
    Ok(acc)
}

struct Scale {
    alpha: f64,
}

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
        Ok(vec![Some(scale_tensor(grad, self.alpha)?)])
    }
}

fn scale_tensor(x: &Tensor, alpha: f64) -> Result<Tensor> {
    Ok(match backend_of("scale", &[x])? {
        Some(be) => be.scale(x, alpha)?,
        None => tops::scale(x, alpha)?,
    })
}

/// `alpha·x`.
pub fn scale(x: &Var, alpha: f64) -> Result<Var> {
    let y = scale_tensor(x.value(), alpha)?;
    Ok(Var::from_op(y, Scale { alpha }, vec![x.clone()]))
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
