//! The teacher's sentence embeddings, kept across epochs of a distillation run.
//!
//! The teacher is frozen and runs without dropout, so its embedding of a training sentence never
//! changes: each is computed the first time a batch draws that sentence and read back after that.
//! From the second epoch on a step runs only the student. The targets travel with every
//! checkpoint, so a resumed run reads exactly the targets the uninterrupted run would have.

use std::collections::BTreeMap;
use std::path::Path;

use scalpel_tensor::{safetensors, Tensor};

use crate::{Result, SurgeryError};

/// Where a checkpoint keeps the targets computed so far.
pub const TEACHER_TARGETS_FILE: &str = "teacher_targets.safetensors";

/// One row of `dim` values per training sentence, filled as the sentences are first drawn.
pub struct TeacherTargets {
    dim: usize,
    values: Vec<f32>,
    known: Vec<bool>,
}

impl TeacherTargets {
    pub fn new(sentences: usize, dim: usize) -> Self {
        TeacherTargets {
            dim,
            // Zeroed pages are only touched as rows are written.
            values: vec![0.0; sentences * dim],
            known: vec![false; sentences],
        }
    }

    /// The targets of the sentences `indices` as `[indices.len(), dim]`; `embed` is called once,
    /// with the sentences among them never seen before (in batch order), and returns their
    /// embeddings as `[new.len(), dim]`.
    pub fn batch(
        &mut self,
        indices: &[usize],
        embed: impl FnOnce(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let new: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| !self.known[i])
            .collect();
        if !new.is_empty() {
            let embedded = embed(&new)?;
            if embedded.shape() != [new.len(), self.dim] {
                return Err(SurgeryError::Invalid(format!(
                    "the teacher's embeddings have shape {:?}, expected [{}, {}]",
                    embedded.shape(),
                    new.len(),
                    self.dim
                )));
            }
            for (&i, row) in new
                .iter()
                .zip(embedded.values::<f32>()?.chunks_exact(self.dim))
            {
                self.row_mut(i).copy_from_slice(row);
                self.known[i] = true;
            }
        }
        let out: Vec<f32> = indices.iter().flat_map(|&i| self.row(i)).copied().collect();
        Ok(Tensor::from_vec(&[indices.len(), self.dim], out)?)
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }

    fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.values[i * self.dim..(i + 1) * self.dim]
    }

    /// Writes the known rows: `indices` (i64, `[k]`) and `embeddings` (f32, `[k, dim]`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let known: Vec<usize> = (0..self.known.len()).filter(|&i| self.known[i]).collect();
        let rows: Vec<f32> = known.iter().flat_map(|&i| self.row(i)).copied().collect();
        let tensors = BTreeMap::from([
            (
                "indices".to_string(),
                Tensor::from_vec(&[known.len()], known.iter().map(|&i| i as i64).collect())?,
            ),
            (
                "embeddings".to_string(),
                Tensor::from_vec(&[known.len(), self.dim], rows)?,
            ),
        ]);
        Ok(safetensors::save(path, &tensors, &BTreeMap::new())?)
    }

    /// Reads what [`TeacherTargets::save`] wrote for a run over `sentences` sentences of `dim`
    /// dimensions; anything else is an error naming the file.
    pub fn load(path: &Path, sentences: usize, dim: usize) -> Result<Self> {
        let bad = |detail: String| SurgeryError::Invalid(format!("{}: {detail}", path.display()));
        let mut file = safetensors::load(path)?;
        let mut take = |name: &str| {
            file.tensors
                .remove(name)
                .ok_or_else(|| bad(format!("`{name}` is missing")))
        };
        let (indices, embeddings) = (take("indices")?, take("embeddings")?);
        let k = indices.numel();
        if indices.shape() != [k] || embeddings.shape() != [k, dim] {
            return Err(bad(format!(
                "expected `indices` [k] and `embeddings` [k, {dim}], found {:?} and {:?}",
                indices.shape(),
                embeddings.shape()
            )));
        }
        let mut targets = TeacherTargets::new(sentences, dim);
        let rows = embeddings.values::<f32>().map_err(|e| bad(e.to_string()))?;
        let indices = indices.values::<i64>().map_err(|e| bad(e.to_string()))?;
        for (&i, row) in indices.iter().zip(rows.chunks_exact(dim)) {
            let i = usize::try_from(i)
                .ok()
                .filter(|&i| i < sentences && !targets.known[i])
                .ok_or_else(|| {
                    bad(format!(
                        "index {i} is out of range for {sentences} sentences or repeated"
                    ))
                })?;
            if row.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("the target of sentence {i} is not finite")));
            }
            targets.row_mut(i).copy_from_slice(row);
            targets.known[i] = true;
        }
        Ok(targets)
    }
}
