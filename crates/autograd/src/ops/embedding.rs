use scalpel_tensor::cpu::embedding::repeated_range;
use scalpel_tensor::{ops as tops, Device, Tensor};

use crate::device::backend_of;
use crate::{AutogradError, Backward, Result, Var};

/// The row indices of an embedding lookup: kept on the host (where they are checked against the
/// table, and where the CPU kernels read them) and, once [`Indices::placed`], also on a device,
/// so that every lookup of the same indices there (a teacher's forward, the backward) reuses one
/// copy. Ranges (position ids, token types) are made on the device rather than copied.
#[derive(Clone, Debug)]
pub struct Indices {
    shape: Vec<usize>,
    kind: IndexKind,
    on_device: Option<Tensor>,
}

#[derive(Clone, Debug)]
enum IndexKind {
    Explicit(Vec<usize>),
    /// Element `i` is `i mod period`.
    Repeating(usize),
}

impl Indices {
    /// `ids` laid out as `shape`.
    pub fn new(ids: Vec<usize>, shape: &[usize]) -> Result<Indices> {
        if shape.iter().product::<usize>() != ids.len() {
            return Err(AutogradError::Graph(format!(
                "{} indices cannot have shape {shape:?}",
                ids.len()
            )));
        }
        Ok(Indices {
            shape: shape.to_vec(),
            kind: IndexKind::Explicit(ids),
            on_device: None,
        })
    }

    /// `shape` filled with `0, 1, …, period − 1, 0, 1, …` (row positions for `period` = the row
    /// length; all zeros for `period` = 1).
    pub fn repeating(shape: &[usize], period: usize) -> Result<Indices> {
        if period == 0 {
            return Err(AutogradError::Graph(
                "indices repeating with period 0".into(),
            ));
        }
        Ok(Indices {
            shape: shape.to_vec(),
            kind: IndexKind::Repeating(period),
            on_device: None,
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The indices on the host.
    pub fn values(&self) -> Vec<usize> {
        match &self.kind {
            IndexKind::Explicit(ids) => ids.clone(),
            IndexKind::Repeating(period) => {
                let mut ids = vec![0; self.len()];
                repeated_range(*period, &mut ids);
                ids
            }
        }
    }

    /// The largest index (none when empty).
    fn max(&self) -> Option<usize> {
        match &self.kind {
            IndexKind::Explicit(ids) => ids.iter().copied().max(),
            IndexKind::Repeating(period) => {
                (!self.is_empty()).then(|| (period - 1).min(self.len() - 1))
            }
        }
    }

    /// These indices with a copy on `device` (uploaded, or made there for a range); the same
    /// indices on the host.
    pub fn placed(&self, device: &Device) -> Result<Indices> {
        let on_device = match device {
            Device::Cpu => None,
            Device::Accelerator(_) if self.on(device).is_some() => self.on_device.clone(),
            Device::Accelerator(be) => Some(match &self.kind {
                IndexKind::Explicit(ids) => be.indices(ids, &self.shape)?,
                IndexKind::Repeating(period) => be.repeated_range(&self.shape, *period)?,
            }),
        };
        Ok(Indices {
            on_device,
            ..self.clone()
        })
    }

    /// The copy on `device`, if there is one.
    fn on(&self, device: &Device) -> Option<&Tensor> {
        self.on_device.as_ref().filter(|t| t.device() == *device)
    }
}

struct Embedding {
    ids: Indices,
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
            Some(be) => {
                let ids = self.ids.on(&grad.device()).expect("placed by the forward");
                be.embedding_backward(table_shape, ids, &flat)?
            }
            None => tops::embedding_backward(table_shape, &self.ids.values(), &flat)?,
        };
        Ok(vec![Some(dtable)])
    }
}

/// Looks up `ids` in `table` (`[vocab, dim]`); the result has shape `[..ids.shape(), dim]`. On a
/// device the indices' copy there is used (made now if they have none).
pub fn embedding(table: &Var, ids: &Indices) -> Result<Var> {
    let t = table.value();
    if t.rank() != 2 {
        return Err(AutogradError::Graph(format!(
            "embedding: table must be [vocab, dim], got {:?}",
            t.shape()
        )));
    }
    if let Some(bad) = ids.max().filter(|&m| m >= t.dim(0)) {
        return Err(AutogradError::Graph(format!(
            "embedding: id {bad} is outside the table of {} rows",
            t.dim(0)
        )));
    }
    let mut shape = ids.shape().to_vec();
    shape.push(t.dim(1));
    let (out, ids) = match backend_of("embedding", &[t])? {
        Some(be) => {
            let ids = ids.placed(&t.device())?;
            let out = be.embedding(t, ids.on(&t.device()).expect("just placed"))?;
            (out, ids)
        }
        None => (tops::embedding(t, &ids.values())?, ids.clone()),
    };
    Ok(Var::from_op(
        out.reshape(&shape)?,
        Embedding { ids },
        vec![table.clone()],
    ))
}
