use scalpel_cuda::{ops as cuda, Runtime};
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::{backward_runtime, download, runtime_for, upload};
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
    let (at, bt) = (a.value(), b.value());
    let out = match runtime_for(&[at, bt]).filter(|_| at.shape() == bt.shape()) {
        Some(rt) => {
            let mut out = rt.zeros::<f32>(at.numel())?;
            cuda::add(&rt, &upload(&rt, at)?, &upload(&rt, bt)?, &mut out)?;
            download(&out, at.shape())?
        }
        None => tops::add(at, bt)?,
    };
    Ok(Var::from_op(out, Add, vec![a.clone(), b.clone()]))
}

struct Scale {
    alpha: f64,
    rt: Option<Runtime>,
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
        Ok(vec![Some(match backward_runtime(&self.rt, grad) {
            Some(rt) => scale_cuda(&rt, grad, self.alpha)?,
            None => tops::scale(grad, self.alpha)?,
        })])
    }
}

pub(crate) fn scale_cuda(rt: &Runtime, x: &Tensor, alpha: f64) -> Result<Tensor> {
    let mut y = upload(rt, x)?;
    cuda::scale(rt, alpha as f32, &mut y)?;
    download(&y, x.shape())
}

/// `alpha·x`.
pub fn scale(x: &Var, alpha: f64) -> Result<Var> {
    let rt = runtime_for(&[x.value()]);
    let y = match &rt {
        Some(rt) => scale_cuda(rt, x.value(), alpha)?,
        None => tops::scale(x.value(), alpha)?,
    };
    Ok(Var::from_op(y, Scale { alpha, rt }, vec![x.clone()]))
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
