use scalpel_tensor::{ops as tops, Tensor};

use crate::{Backward, Result, Var};

struct Embedding {
    ids: Vec<usize>,
}

impl Backward for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn backward(
        &self,
        inputs: &[Var],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
    ) -> Result<Vec<Option<Tensor>>> {
        let dim = inputs[0].shape()[1];
        let flat = grad.clone().reshape(&[self.ids.len(), dim])?;
        Ok(vec![Some(tops::embedding_backward(
            inputs[0].shape(),
            &self.ids,
            &flat,
        )?)])
    }
}

/// Looks up `ids` in `table` (`[vocab, dim]`); the result has shape `[..id_shape, dim]`.
pub fn embedding(table: &Var, ids: &[usize], id_shape: &[usize]) -> Result<Var> {
    let mut shape = id_shape.to_vec();
    shape.push(table.shape()[1]);
    let out = tops::embedding(table.value(), ids)?.reshape(&shape)?;
    Ok(Var::from_op(
        out,
        Embedding { ids: ids.to_vec() },
        vec![table.clone()],
    ))
}
