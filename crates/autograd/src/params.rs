//! Named parameters: the unit that optimisers update, freezing selects, and checkpoints save.

use std::collections::BTreeMap;

use scalpel_tensor::{DType, Device, Tensor};

use crate::{AutogradError, Result, Var};

/// Every tensor of a model by name, in name order. Trainable entries are [`Var::parameter`]s;
/// frozen (and non-float) entries are constants, so no gradient is ever computed for them.
#[derive(Clone, Default)]
pub struct Params {
    entries: BTreeMap<String, Var>,
}

impl Params {
    /// All float tensors start trainable; integer tensors (e.g. `position_ids`) are constants.
    pub fn from_tensors(tensors: BTreeMap<String, Tensor>) -> Params {
        let entries = tensors
            .into_iter()
            .map(|(name, t)| {
                let var = if t.dtype().is_float() {
                    Var::parameter(t)
                } else {
                    Var::constant(t)
                };
                (name, var)
            })
            .collect();
        Params { entries }
    }

    pub fn get(&self, name: &str) -> Result<&Var> {
        self.entries
            .get(name)
            .ok_or_else(|| AutogradError::Graph(format!("no parameter named `{name}`")))
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Var> {
        self.entries.get_mut(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Var)> {
        self.entries.iter_mut().map(|(n, v)| (n.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Names of the entries that will receive gradients.
    pub fn trainable(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.iter().filter(|(_, v)| v.requires_grad())
    }

    /// Turns every entry whose name `selects` into a constant. Returns how many were frozen.
    pub fn freeze(&mut self, selects: impl Fn(&str) -> bool) -> usize {
        let mut frozen = 0;
        for (name, var) in self.entries.iter_mut() {
            if var.requires_grad() && selects(name) {
                *var = Var::constant(var.value().clone());
                frozen += 1;
            }
        }
        frozen
    }

    /// Makes every float entry whose name `selects` trainable again. Returns how many changed.
    pub fn unfreeze(&mut self, selects: impl Fn(&str) -> bool) -> usize {
        let mut thawed = 0;
        for (name, var) in self.entries.iter_mut() {
            if !var.requires_grad() && var.value().dtype().is_float() && selects(name) {
                *var = Var::parameter(var.value().clone());
                thawed += 1;
            }
        }
        thawed
    }

    pub fn insert(&mut self, name: impl Into<String>, var: Var) {
        self.entries.insert(name.into(), var);
    }

    pub fn remove(&mut self, name: &str) -> Option<Var> {
        self.entries.remove(name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Moves every f32 entry to `device` (once: entries already there stay as they are; integer
    /// entries such as `position_ids`, which no kernel reads, stay on the host). Entries keep
    /// their identity and trainability.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        for var in self.entries.values_mut() {
            if var.value().dtype() == DType::F32 && var.value().device() != *device {
                let moved = device.place(var.value())?;
                *var.value_mut()? = moved;
            }
        }
        Ok(())
    }

    /// Snapshot of the values, e.g. for saving (device entries stay where they are; saving reads
    /// them back).
    pub fn to_tensors(&self) -> BTreeMap<String, Tensor> {
        self.entries
            .iter()
            .map(|(n, v)| (n.clone(), v.value().clone()))
            .collect()
    }
}
