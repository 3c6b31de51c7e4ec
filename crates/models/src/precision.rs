//! Holding a model's linear weights in another float format for inference.

use scalpel_autograd::{Params, Var};
use scalpel_tensor::DType;

use crate::{ModelError, Result};

/// Converts the weights `names` of `params` to `dtype` (F32 or BF16: the formats the CPU linear
/// layers take), rounding once and dropping the old copy. A BF16 weight is held only as its
/// bf16 GEMM packing ([`scalpel_tensor::Tensor::packed_for_linear`]): in memory once, rather
/// than as values beside the packing the first multiply would make. Inference only: a trainable
/// weight or one on a device is an error naming it.
pub(crate) fn set_weights_dtype(params: &mut Params, names: &[String], dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(ModelError::Input(format!(
            "linear weights can be held in F32 or BF16, not {dtype:?}"
        )));
    }
    for name in names {
        let w = params.get(name)?;
        if w.value().dtype() == dtype {
            continue;
        }
        if w.requires_grad() || !w.value().is_host() {
            return Err(ModelError::Input(format!(
                "{name}: {dtype:?} linear weights are for inference on the CPU (this one is {})",
                if w.requires_grad() {
                    "trainable"
                } else {
                    "on a device"
                }
            )));
        }
        let converted = Var::constant(match dtype {
            DType::BF16 => w.value().packed_for_linear(dtype)?,
            _ => w.value().to_dtype(dtype),
        });
        params.insert(name.clone(), converted);
    }
    Ok(())
}
