//! `Tensor::to_dtype` into bf16 and f16 against the definition of rounding: the result is the
//! value of the format nearest the source (no neighbour closer), ties to the even one.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_tensor::{DType, Tensor};

/// A 16-bit float format: its dtype, the mantissa bits an f32 has beyond it, the value of a bit
/// pattern, and the decimal exponents its normal numbers span comfortably.
struct Format {
    dtype: DType,
    extra_f32_bits: u32,
    value: fn(u16) -> f64,
    exponents: std::ops::Range<i32>,
}

const BF16: Format = Format {
    dtype: DType::BF16,
    extra_f32_bits: 16,
    value: |b| bf16::from_bits(b).to_f64(),
    exponents: -30..25,
};
const F16: Format = Format {
    dtype: DType::F16,
    extra_f32_bits: 13,
    value: |b| f16::from_bits(b).to_f64(),
    exponents: -3..3,
};

/// Bit patterns of a 16-bit tensor.
fn bits(t: &Tensor) -> Vec<u16> {
    match t.dtype() {
        DType::BF16 => t
            .values::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::F16 => t
            .values::<f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        other => panic!("{other:?} is not a 16-bit format"),
    }
}

/// `got` is the value nearest `v` among itself and its two neighbours, the even one on a tie.
/// For normal `v` each distance is exact in f64 (the values are within a factor of two).
fn assert_nearest_even(f: &Format, v: f64, got: u16, what: &str) {
    let distance = |b: u16| (v - (f.value)(b)).abs();
    for neighbour in [got.wrapping_sub(1), got + 1] {
        let (d, dn) = (distance(got), distance(neighbour));
        assert!(
            d < dn || (d == dn && got.is_multiple_of(2)),
            "{:?} of {what} {v:e} ({:016x}) is {got:04x}; {neighbour:04x} is nearer or even",
            f.dtype,
            v.to_bits(),
        );
    }
}

/// Random f32 and f64 values, a third of them a tie or one unit of the source's last place off
/// one: the place where half 2.7's `from_f64` rounded bf16 the wrong way.
#[test]
fn to_dtype_rounds_f32_and_f64_to_the_nearest_bf16_and_f16_ties_to_even() {
    let mut rng = StdRng::seed_from_u64(40);
    let n = 30_000;
    for f in [BF16, F16] {
        let tie32 = |v: f32| {
            let half_unit = 1u32 << (f.extra_f32_bits - 1);
            (v.to_bits() & !(2 * half_unit - 1)) | half_unit
        };
        // f64 has 29 more mantissa bits than f32.
        let tie64 = |v: f64| {
            let half_unit = 1u64 << (f.extra_f32_bits + 29 - 1);
            (v.to_bits() & !(2 * half_unit - 1)) | half_unit
        };
        let f32s: Vec<f32> = (0..n)
            .map(|i| {
                let v: f32 =
                    rng.gen_range(-10.0..10.0) * 10f32.powi(rng.gen_range(f.exponents.clone()));
                match i % 6 {
                    0 => f32::from_bits(tie32(v)),
                    1 => f32::from_bits(tie32(v) + 1),
                    2 => f32::from_bits(tie32(v) - 1),
                    _ => v,
                }
            })
            .collect();
        let f64s: Vec<f64> = f32s
            .iter()
            .enumerate()
            .map(|(i, &v)| match i % 6 {
                0 => f64::from_bits(tie64(v as f64)),
                1 => f64::from_bits(tie64(v as f64) + 1),
                2 => f64::from_bits(tie64(v as f64) - 1),
                _ => v as f64 * (1.0 + rng.gen_range(-1e-9..1e-9)),
            })
            .collect();
        let from32 = bits(
            &Tensor::from_vec(&[n], f32s.clone())
                .unwrap()
                .to_dtype(f.dtype),
        );
        let from64 = bits(
            &Tensor::from_vec(&[n], f64s.clone())
                .unwrap()
                .to_dtype(f.dtype),
        );
        for (i, (&v, &got)) in f32s.iter().zip(&from32).enumerate() {
            assert_nearest_even(&f, v as f64, got, &format!("f32 {i}"));
        }
        for (i, (&v, &got)) in f64s.iter().zip(&from64).enumerate() {
            assert_nearest_even(&f, v, got, &format!("f64 {i}"));
        }
    }
}
