//! The CPU backend's packed linear weights: a weight that many calls multiply unchanged (a
//! constant, at inference) is packed once into the layout its GEMM reads and kept while the
//! weight's storage lives.
//!
//! Entries are keyed by the address of the weight's host or mapped storage and hold it weakly: tensors
//! share their storage on clone, so a weight packs once however many tensors (or autograd
//! variables) hold it, and a write to the weight copies the storage away from the entry
//! ([`crate::Tensor::values_mut`] copies a buffer something else still refers to), so a packing
//! never outlives the values it was made from. An entry whose storage has been dropped is freed
//! at the next lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::cpu::gemm::PackedB;
use crate::cpu::gemm_bf16::{Bf16Path, PackedBf16Weight};
use crate::tensor::WeakStorage;
use crate::{DType, Data, Tensor};

/// A linear weight `W` (`[out, in]`) packed for `x·Wᵀ`.
pub enum PackedWeight {
    /// An `f32` weight, for the f32 GEMM.
    F32(PackedB),
    /// A `bf16` weight (or an `f32` one rounded), for the bf16 GEMM.
    Bf16(PackedBf16Weight),
    /// An `f32` weight trained with bf16 GEMMs: rounded and packed for `x·Wᵀ`, and transposed
    /// for the input gradient `dY·W` ([`PackedBf16Weight::pack_transposed`]). Made again
    /// after each optimiser step, which moves the weight to new storage.
    Bf16Training {
        forward: PackedBf16Weight,
        input_grad: PackedBf16Weight,
    },
}

impl PackedWeight {
    /// Packs the `[out, in]` host weight `w`: an `f32` weight for the f32 GEMM, a `bf16` one for
    /// the bf16 GEMM on [`Bf16Path::best`]. `None` for other dtypes and shapes.
    pub fn pack(w: &Tensor) -> Option<PackedWeight> {
        if w.rank() != 2 {
            return None;
        }
        let (out_f, in_f) = (w.dim(0), w.dim(1));
        match w.dtype() {
            DType::F32 => Some(PackedWeight::F32(PackedB::for_linear(
                w.values::<f32>().ok()?,
                out_f,
                in_f,
            ))),
            DType::BF16 => Some(PackedWeight::Bf16(PackedBf16Weight::pack(
                Bf16Path::best(),
                w.values::<half::bf16>().ok()?,
                out_f,
                in_f,
            ))),
            _ => None,
        }
    }

    /// The `[out, in]` host weight `w` (`f32` or `bf16`) rounded to bf16 and packed for the
    /// bf16 GEMM on [`Bf16Path::best`]: for `x·Wᵀ` alone, or also for the input gradient when
    /// `training`. `None` for other dtypes and shapes.
    pub fn pack_bf16(w: &Tensor, training: bool) -> Option<PackedWeight> {
        if w.rank() != 2 {
            return None;
        }
        let (out_f, in_f, path) = (w.dim(0), w.dim(1), Bf16Path::best());
        let pack = |forward: bool| -> Option<PackedBf16Weight> {
            Some(match (w.dtype(), forward) {
                (DType::F32, true) => {
                    PackedBf16Weight::pack(path, w.values::<f32>().ok()?, out_f, in_f)
                }
                (DType::F32, false) => {
                    PackedBf16Weight::pack_transposed(path, w.values::<f32>().ok()?, in_f, out_f)
                }
                (DType::BF16, true) => {
                    PackedBf16Weight::pack(path, w.values::<half::bf16>().ok()?, out_f, in_f)
                }
                (DType::BF16, false) => PackedBf16Weight::pack_transposed(
                    path,
                    w.values::<half::bf16>().ok()?,
                    in_f,
                    out_f,
                ),
                _ => return None,
            })
        };
        Some(if training {
            PackedWeight::Bf16Training {
                forward: pack(true)?,
                input_grad: pack(false)?,
            }
        } else {
            PackedWeight::Bf16(pack(true)?)
        })
    }

    /// The packing `x·Wᵀ` multiplies by on the bf16 GEMM, if this is a bf16 one.
    pub fn bf16_forward(&self) -> Option<&PackedBf16Weight> {
        match self {
            PackedWeight::Bf16(p) | PackedWeight::Bf16Training { forward: p, .. } => Some(p),
            PackedWeight::F32(_) => None,
        }
    }

    /// The weight's `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            PackedWeight::F32(p) => {
                let (k, n) = p.shape();
                (n, k)
            }
            PackedWeight::Bf16(p) | PackedWeight::Bf16Training { forward: p, .. } => p.shape(),
        }
    }

    /// The `[out, in]` weight read back from its packing (`f32`, or `bf16` as rounded).
    pub fn unpack(&self) -> Data {
        match self {
            PackedWeight::F32(p) => {
                let (out_f, in_f) = self.shape();
                Data::F32(
                    (0..out_f * in_f)
                        .map(|i| p.value(i % in_f, i / in_f))
                        .collect(),
                )
            }
            PackedWeight::Bf16(p) | PackedWeight::Bf16Training { forward: p, .. } => {
                Data::BF16(p.unpack())
            }
        }
    }

    /// Memory the packed panels hold.
    pub fn bytes(&self) -> usize {
        match self {
            PackedWeight::F32(p) => p.bytes(),
            PackedWeight::Bf16(p) => p.bytes(),
            PackedWeight::Bf16Training {
                forward,
                input_grad,
            } => forward.bytes() + input_grad.bytes(),
        }
    }
}

struct Entry {
    storage: WeakStorage,
    packed: Arc<PackedWeight>,
}

/// Packings by the address of their weight's storage. The entry's `Weak` keeps that address
/// allocated, so no other storage can take it while the entry exists.
static CACHE: Mutex<Option<HashMap<usize, Entry>>> = Mutex::new(None);

fn with_cache<R>(f: impl FnOnce(&mut HashMap<usize, Entry>) -> R) -> R {
    let mut guard = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    // Dropped weights free their packing here: a model's worth of entries is a few dozen.
    cache.retain(|_, e| e.storage.is_alive());
    f(cache)
}

/// The packing of host weight `w` made earlier, if any: the one it is held as
/// ([`Tensor::packed_for_linear`]), or a cached one.
pub fn cached(w: &Tensor) -> Option<Arc<PackedWeight>> {
    if let Some(packing) = w.linear_packing() {
        return Some(Arc::clone(packing));
    }
    let (key, _) = w.host_storage()?;
    with_cache(|cache| cache.get(&key).map(|e| Arc::clone(&e.packed)))
}

/// The packing of host weight `w`, made now (and kept while `w`'s storage lives) if there is
/// none yet. `None` where [`PackedWeight::pack`] has none to make.
pub fn packed(w: &Tensor) -> Option<Arc<PackedWeight>> {
    let native = |p: &PackedWeight| match p {
        PackedWeight::F32(_) => w.dtype() == DType::F32,
        PackedWeight::Bf16(_) => w.dtype() == DType::BF16,
        PackedWeight::Bf16Training { .. } => false,
    };
    packed_by(w, native, || PackedWeight::pack(w))
}

/// [`PackedWeight::pack_bf16`] of host weight `w` kept as [`packed`] keeps its packing: an `f32`
/// weight multiplied on the bf16 GEMM (mixed-precision training when `training`, which also
/// packs it for the input gradient).
pub fn packed_bf16(w: &Tensor, training: bool) -> Option<Arc<PackedWeight>> {
    let suits = |p: &PackedWeight| match p {
        PackedWeight::Bf16Training { .. } => true,
        PackedWeight::Bf16(_) => !training,
        PackedWeight::F32(_) => false,
    };
    packed_by(w, suits, || PackedWeight::pack_bf16(w, training))
}

/// The cached packing of `w` if it `suits`, else a new one from `pack`, which replaces it.
fn packed_by(
    w: &Tensor,
    suits: impl Fn(&PackedWeight) -> bool,
    pack: impl FnOnce() -> Option<PackedWeight>,
) -> Option<Arc<PackedWeight>> {
    if let Some(p) = cached(w).filter(|p| suits(p)) {
        return Some(p);
    }
    let (key, storage) = w.host_storage()?;
    // Packed outside the lock: other threads' lookups do not wait for it. Two threads packing
    // the same weight at once both pack, and the first entry stays.
    let packed = Arc::new(pack()?);
    Some(with_cache(|cache| {
        let entry = cache
            .entry(key)
            .and_modify(|e| {
                if !suits(&e.packed) {
                    e.packed = Arc::clone(&packed);
                }
            })
            .or_insert_with(|| Entry { storage, packed });
        Arc::clone(&entry.packed)
    }))
}

/// Bytes held by every live packing.
pub fn held_bytes() -> usize {
    with_cache(|cache| cache.values().map(|e| e.packed.bytes()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packing_is_freed_with_its_weight() {
        let w = Tensor::from_vec(&[3, 4], (0..12).map(|v| v as f32).collect()).unwrap();
        let packing = Arc::downgrade(&packed(&w).expect("an f32 matrix packs"));
        let clone = w.clone();
        drop(w);
        assert!(cached(&clone).is_some(), "a clone shares the storage");
        drop(clone);
        // Any lookup frees the entries of dropped weights.
        cached(&Tensor::zeros(&[1, 1], DType::F32));
        assert!(
            packing.upgrade().is_none(),
            "the packing outlived its weight"
        );
    }
}
