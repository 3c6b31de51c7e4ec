use scalpel_cuda::{ops as cuda, Runtime};
use scalpel_tensor::{ops as tops, Tensor};

use crate::device::{backward_runtime, download, runtime_for, upload, upload_ids};
use crate::{Backward, Result, Var};

struct Embedding {
    ids: Vec<usize>,
    rt: Option<Runtime>,
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
        let dim = table_shape[1];
        let flat = grad.clone().reshape(&[self.ids.len(), dim])?;
        let dtable = match backward_runtime(&self.rt, grad) {
            Some(rt) => {
                let mut dtable = rt.zeros::<f32>(table_shape.iter().product())?;
                let ids = upload_ids(&rt, &self.ids)?;
                cuda::embedding_backward(&rt, dim, &ids, &upload(&rt, &flat)?, &mut dtable)?;
                download(&dtable, table_shape)?
            }
            None => tops::embedding_backward(table_shape, &self.ids, &flat)?,
        };
        Ok(vec![Some(dtable)])
    }
}

/// Looks up `ids` in `table` (`[vocab, dim]`); the result has shape `[..id_shape, dim]`.
pub fn embedding(table: &Var, ids: &[usize], id_shape: &[usize]) -> Result<Var> {
    let t = table.value();
    let mut shape = id_shape.to_vec();
    shape.push(table.shape()[1]);
    // The ids are checked against the table on the host: the kernels do not check them.
    let valid = t.rank() == 2 && ids.iter().all(|&i| i < t.dim(0));
    let rt = runtime_for(&[t]).filter(|_| valid);
    let out = match &rt {
        Some(rt) => {
            let dim = t.dim(1);
            let mut out = rt.zeros::<f32>(ids.len() * dim)?;
            let ids = upload_ids(rt, ids)?;
            cuda::embedding_forward(rt, dim, &upload(rt, t)?, &ids, &mut out)?;
            download(&out, &[ids.len(), dim])?
        }
        None => tops::embedding(t, ids)?,
    }
    .reshape(&shape)?;
    Ok(Var::from_op(
        out,
        Embedding {
            ids: ids.to_vec(),
            rt,
        },
        vec![table.clone()],
    ))
}
