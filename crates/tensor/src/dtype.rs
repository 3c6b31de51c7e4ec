use half::{bf16, f16};

use crate::Data;

/// Element types a tensor can hold. Compute happens in `F32` (and `F64` on the CPU, for gradient
/// checks); `F16`/`BF16` are storage formats converted on load; `I32` holds token and position
/// indices (the kernels' index type, on a device as on the host); `I64` carries the integer tensors
/// checkpoints ship (e.g. BERT's `position_ids`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I32,
    I64,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32 | DType::I64)
    }
}

/// A Rust type that can be a tensor element: it knows its [`DType`] and how to move in and out
/// of the type-erased [`Data`] enum.
pub trait Element: Copy + Send + Sync + bytemuck::Pod + 'static {
    const DTYPE: DType;
    fn into_data(values: Vec<Self>) -> Data;
    fn slice(data: &Data) -> Option<&[Self]>;
    fn slice_mut(data: &mut Data) -> Option<&mut [Self]>;
    /// Lossy conversion used by `Tensor::to_dtype`; integers round-trip through f64 exactly up to 2^53.
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn into_data(values: Vec<Self>) -> Data {
                Data::$variant(values)
            }
            fn slice(data: &Data) -> Option<&[Self]> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(data: &mut Data) -> Option<&mut [Self]> {
                match data {
                    Data::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn to_f64(self) -> f64 {
                ($to)(self)
            }
            fn from_f64(v: f64) -> Self {
                ($from)(v)
            }
        }
    };
}

element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, |x: f64| x, |v: f64| v);
element!(f16, F16, |x: f16| x.to_f64(), |v| f16::from_f32(
    rounded_to_odd(v)
));
element!(bf16, BF16, |x: bf16| x.to_f64(), |v| bf16::from_f32(
    rounded_to_odd(v)
));
element!(i32, I32, |x: i32| x as f64, |v: f64| v as i32);
element!(i64, I64, |x: i64| x as f64, |v: f64| v as i64);

/// `v` rounded to f32 *to odd*: toward zero, with the last bit set when inexact. Rounding that
/// to f16 or bf16 to nearest even rounds `v` correctly (f32 carries at least two more bits than
/// either), where `half` 2.7's `from_f64` decides from the upper 32 bits of `v` only and rounds a
/// value just above a tie whose deciding bits lie lower down the wrong way (1 in 20,000 random
/// f32 values into bf16; f64 values into f16 too; half-rs issue #151).
fn rounded_to_odd(v: f64) -> f32 {
    let nearest = v as f32;
    if nearest.is_nan() || nearest as f64 == v {
        return nearest;
    }
    let toward_zero = match (nearest as f64).abs() > v.abs() {
        true => nearest.to_bits() - 1,
        false => nearest.to_bits(),
    };
    f32::from_bits(toward_zero | 1)
}
