use scalpel_tensor::cpu::rope::Rotation;
use scalpel_tensor::{decoder_ops as dops, Tensor};

use crate::device::backend_of;
use crate::{Backward, Result, Var};

struct Rope {
    head_dim: usize,
    positions: Vec<usize>,
    theta: f64,
}

impl Backward for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn backward(
        &self,
        _: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let (d, p, theta) = (self.head_dim, &self.positions, self.theta);
        let dx = match backend_of("rope backward", &[grad])? {
            Some(be) => be.rope(grad, d, p, theta, Rotation::Inverse)?,
            None => dops::rope(grad, d, p, theta, Rotation::Inverse)?,
        };
        Ok(vec![Some(dx)])
    }
}

/// Rotary position embeddings ("rotate half", as transformers' Llama) of `x`
/// `[batch, seq, heads·head_dim]`, row `t` of each sequence at position `positions[t]`, base
/// `theta`. The backward is the inverse rotation, so nothing is saved but the positions.
pub fn rope(x: &Var, head_dim: usize, positions: &[usize], theta: f64) -> Result<Var> {
    let xt = x.value();
    let y = match backend_of("rope", &[xt])? {
        Some(be) => be.rope(xt, head_dim, positions, theta, Rotation::Forward)?,
        None => dops::rope(xt, head_dim, positions, theta, Rotation::Forward)?,
    };
    let op = Rope {
        head_dim,
        positions: positions.to_vec(),
        theta,
    };
    Ok(Var::from_op(y, op, vec![x.clone()]))
}
