use scalpel_cuda::{ops as cuda, Runtime};
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::{backward_runtime, download, runtime_for, upload};
use crate::{Backward, Result, Var};

struct MeanPool {
    rt: Option<Runtime>,
}

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
        let dx = match backward_runtime(&self.rt, grad) {
            Some(rt) if grad.shape() == [x_shape[0], x_shape[2]] => {
                let mut dx = rt.zeros::<f32>(x_shape.iter().product())?;
                cuda::mean_pool_backward(
                    &rt,
                    x_shape[1],
                    x_shape[2],
                    &upload(&rt, mask)?,
                    &upload(&rt, grad)?,
                    &mut dx,
                )?;
                download(&dx, x_shape)?
            }
            _ => tops::mean_pool_backward(mask, x_shape, grad)?,
        };
        Ok(vec![Some(dx), None])
    }
}

/// Mean over unmasked tokens: `[batch, seq, dim]`, constant mask `[batch, seq]` → `[batch, dim]`.
pub fn mean_pool(x: &Var, mask: &Var) -> Result<Var> {
    let (xt, mt) = (x.value(), mask.value());
    let shapes_ok = xt.rank() == 3 && mt.shape() == &xt.shape()[..2];
    let rt = runtime_for(&[xt, mt]).filter(|_| shapes_ok);
    let y = match &rt {
        Some(rt) => {
            let (b, s, d) = (xt.dim(0), xt.dim(1), xt.dim(2));
            let mut y = rt.zeros::<f32>(b * d)?;
            cuda::mean_pool_forward(rt, s, d, &upload(rt, xt)?, &upload(rt, mt)?, &mut y)?;
            download(&y, &[b, d])?
        }
        None => tops::mean_pool(xt, mt)?,
    };
    Ok(Var::from_op(
        y,
        MeanPool { rt },
        vec![x.clone(), mask.clone()],
    ))
}

struct L2Normalize {
    norms: Tensor,
    rt: Option<Runtime>,
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
        let dx = match backward_runtime(&self.rt, grad) {
            Some(rt) if grad.shape() == out.shape() => {
                let mut dx = rt.zeros::<f32>(out.numel())?;
                cuda::l2_normalize_backward(
                    &rt,
                    out.dim(-1),
                    &upload(&rt, out)?,
                    &upload(&rt, &self.norms)?,
                    &upload(&rt, grad)?,
                    &mut dx,
                )?;
                download(&dx, out.shape())?
            }
            _ => tops::l2_normalize_backward(out, &self.norms, grad)?,
        };
        Ok(vec![Some(dx)])
    }
}

/// Each row divided by its L2 norm (clamped below at 1e-12, as PyTorch's `F.normalize`).
pub fn l2_normalize(x: &Var) -> Result<Var> {
    let xt = x.value();
    let rt = runtime_for(&[xt]).filter(|_| xt.rank() > 0 && xt.dim(-1) > 0);
    let (y, norms) = match &rt {
        Some(rt) => {
            let dim = xt.dim(-1);
            let rows = xt.numel() / dim;
            let mut y = rt.zeros::<f32>(xt.numel())?;
            let mut norms = rt.zeros::<f32>(rows)?;
            cuda::l2_normalize_forward(rt, dim, &upload(rt, xt)?, &mut y, &mut norms)?;
            (download(&y, xt.shape())?, download(&norms, &[rows])?)
        }
        None => tops::l2_normalize(xt)?,
    };
    Ok(Var::from_op(y, L2Normalize { norms, rt }, vec![x.clone()]))
}
