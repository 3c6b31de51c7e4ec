use scalpel_cuda::{ops as cuda, Runtime};
use scalpel_tensor::cpu::layernorm::LayerNormShape;
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::{backward_runtime, download, runtime_for, upload};
use crate::ops::add;
use crate::{Backward, Result, Var};

struct LayerNorm {
    mean: Tensor,
    rstd: Tensor,
    rt: Option<Runtime>,
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
        let (x, gamma) = (inputs[0].value(), inputs[1].value());
        let (dx, dgamma, dbeta) = match backward_runtime(&self.rt, grad) {
            Some(rt) if grad.shape() == x.shape() => {
                let s = shape_of(x, gamma, 0.0);
                let mut dx = rt.zeros::<f32>(x.numel())?;
                let mut dgamma = rt.zeros::<f32>(s.cols)?;
                let mut dbeta = rt.zeros::<f32>(s.cols)?;
                cuda::layernorm_backward(
                    &rt,
                    &s,
                    &upload(&rt, x)?,
                    &upload(&rt, gamma)?,
                    &upload(&rt, &self.mean)?,
                    &upload(&rt, &self.rstd)?,
                    &upload(&rt, grad)?,
                    &mut dx,
                    &mut dgamma,
                    &mut dbeta,
                )?;
                (
                    download(&dx, x.shape())?,
                    download(&dgamma, gamma.shape())?,
                    download(&dbeta, gamma.shape())?,
                )
            }
            _ => tops::layernorm_backward(x, gamma, &self.mean, &self.rstd, grad)?,
        };
        Ok(vec![
            needs[0].then_some(dx),
            needs[1].then_some(dgamma),
            needs[2].then_some(dbeta),
        ])
    }
}

fn shape_of(x: &Tensor, gamma: &Tensor, eps: f64) -> LayerNormShape {
    let cols = gamma.numel();
    LayerNormShape {
        rows: x.numel() / cols.max(1),
        cols,
        eps,
    }
}

/// LayerNorm over the last dimension with affine `gamma`, `beta`.
pub fn layernorm(x: &Var, gamma: &Var, beta: &Var, eps: f64) -> Result<Var> {
    let (xt, gt, bt) = (x.value(), gamma.value(), beta.value());
    let cols = if xt.rank() == 0 { 0 } else { xt.dim(-1) };
    let shapes_ok = cols > 0 && gt.shape() == [cols] && bt.shape() == [cols];
    let rt = runtime_for(&[xt, gt, bt]).filter(|_| shapes_ok);
    let (y, mean, rstd) = match &rt {
        Some(rt) => {
            let s = shape_of(xt, gt, eps);
            let mut y = rt.zeros::<f32>(xt.numel())?;
            let mut mean = rt.zeros::<f32>(s.rows)?;
            let mut rstd = rt.zeros::<f32>(s.rows)?;
            cuda::layernorm_forward(
                rt,
                &s,
                &upload(rt, xt)?,
                &upload(rt, gt)?,
                &upload(rt, bt)?,
                &mut y,
                &mut mean,
                &mut rstd,
            )?;
            (
                download(&y, xt.shape())?,
                download(&mean, &[s.rows])?,
                download(&rstd, &[s.rows])?,
            )
        }
        None => tops::layernorm(xt, gt, bt, eps)?,
    };
    Ok(Var::from_op(
        y,
        LayerNorm { mean, rstd, rt },
        vec![x.clone(), gamma.clone(), beta.clone()],
    ))
}

/// `LayerNorm(x + residual)`, consuming `x`: a transformer block's residual connection and
/// normalisation. When nothing needs a gradient, `x` is a constant nothing else holds and no
/// device is in use (inference), the sum and the normalisation are one in-place pass over `x`'s
/// storage; otherwise this is [`layernorm`] of [`add`], gradients included.
pub fn add_layernorm(x: Var, residual: &Var, gamma: &Var, beta: &Var, eps: f64) -> Result<Var> {
    let others = [residual, gamma, beta];
    let fusable = others.iter().all(|v| !v.requires_grad())
        && runtime_for(&[x.value(), residual.value(), gamma.value(), beta.value()]).is_none();
    let x = if fusable {
        match x.into_unshared_constant() {
            Ok(mut value) => {
                let (r, g, b) = (residual.value(), gamma.value(), beta.value());
                tops::add_layernorm_in_place(&mut value, r, g, b, eps)?;
                return Ok(Var::constant(value));
            }
            Err(x) => x,
        }
    } else {
        x
    };
    layernorm(&add(&x, residual)?, gamma, beta, eps)
}
