//! `Tensor::to_dtype` into bf16 against the definition of rounding: the result is the bf16
//! value nearest the source (no neighbour closer), ties to the even one.

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_tensor::{DType, Tensor};

/// `r` is the bf16 value nearest `v` among itself and its two neighbours, the even one on a
/// tie. For normal `v` each distance is exact in f64 (the values are within a factor of two).
fn assert_nearest_even(v: f64, r: bf16, what: &str) {
    let bits = r.to_bits();
    let distance = |b: u16| (v - bf16::from_bits(b).to_f64()).abs();
    for neighbour in [bits.wrapping_sub(1), bits + 1] {
        let (d, dn) = (distance(bits), distance(neighbour));
        assert!(
            d < dn || (d == dn && bits.is_multiple_of(2)),
            "{what} {v:e} ({:016x}) became {r} ({bits:04x}); {} ({neighbour:04x}) is nearer or even",
            v.to_bits(),
            bf16::from_bits(neighbour)
        );
    }
}

/// Random f32 and f64 values, a third of them a tie or one unit of the last place (of the
/// source) off a tie, the place that half 2.7's `bf16::from_f64` got wrong.
#[test]
fn to_dtype_rounds_f32_and_f64_to_the_nearest_bf16_ties_to_even() {
    let mut rng = StdRng::seed_from_u64(40);
    let n = 30_000;
    let f32s: Vec<f32> = (0..n)
        .map(|i| {
            let v: f32 = rng.gen_range(-1e6..1e6) * 10f32.powi(rng.gen_range(-30..25));
            let tie = (v.to_bits() & !0xffff) | 0x8000;
            match i % 6 {
                0 => f32::from_bits(tie),
                1 => f32::from_bits(tie + 1),
                2 => f32::from_bits(tie - 1),
                _ => v,
            }
        })
        .collect();
    let f64s: Vec<f64> = f32s
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let tie = (v as f64).to_bits() & !((1 << 45) - 1) | (1 << 44);
            match i % 6 {
                0 => f64::from_bits(tie),
                1 => f64::from_bits(tie + 1),
                2 => f64::from_bits(tie - 1),
                _ => v as f64 * (1.0 + rng.gen_range(-1e-9..1e-9)),
            }
        })
        .collect();
    let from32 = Tensor::from_vec(&[n], f32s.clone())
        .unwrap()
        .to_dtype(DType::BF16);
    let from64 = Tensor::from_vec(&[n], f64s.clone())
        .unwrap()
        .to_dtype(DType::BF16);
    for (i, (&v, r)) in f32s
        .iter()
        .zip(from32.values::<bf16>().unwrap())
        .enumerate()
    {
        assert_nearest_even(v as f64, *r, &format!("f32 {i}"));
    }
    for (i, (&v, r)) in f64s
        .iter()
        .zip(from64.values::<bf16>().unwrap())
        .enumerate()
    {
        assert_nearest_even(v, *r, &format!("f64 {i}"));
    }
}
