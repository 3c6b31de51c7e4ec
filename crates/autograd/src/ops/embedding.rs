use scalpel_tensor::{ops as tops, Tensor};

use crate::device::backend_of;
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
        let table_shape = inputs[0].shape();
        let flat = grad.clone().reshape(&[self.ids.len(), table_shape[1]])?;
        let dtable = match backend_of("embedding backward", &[grad])? {
            Some(be) => be.embedding_backward(table_shape, &self.ids, &flat)?,
            None => tops::embedding_backward(table_shape, &self.ids, &flat)?,
        };
        Ok(vec![Some(dtable)])
    }
}

/// Looks up `ids` in `table` (`[vocab, dim]`); the result has shape `[..id_shape, dim]`.
pub fn embedding(table: &Var, ids: &[usize], id_shape: &[usize]) -> Result<Var> {
    let t = table.value();
    let mut shape = id_shape.to_vec();
    shape.push(table.shape().get(1).copied().unwrap_or(0));
    let out = match backend_of("embedding", &[t])? {
        Some(be) => be.embedding(t, ids)?,
        None => tops::embedding(t, ids)?,
    }
    .reshape(&shape)?;
    Ok(Var::from_op(
        out,
        Embedding { ids: ids.to_vec() },
        vec![table.clone()],
    ))
}
