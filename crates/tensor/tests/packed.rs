//! Linear weights held only as their GEMM packing (`Tensor::packed_for_linear`): their values
//! read back exactly as rounded, a linear layer multiplies by the packing itself, and every
//! other use (another shape, a write) still sees the plain tensor.

use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_tensor::cpu::gemm::Activation;
use scalpel_tensor::ops::{self, WeightUse};
use scalpel_tensor::{DType, Tensor};

fn uniform(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()).unwrap()
}

/// `x·Wᵀ + b` in f64 of the values given.
fn reference(x: &[f64], w: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    (0..m * n)
        .map(|i| {
            let (r, j) = (i / n, i % n);
            b[j] + (0..k).map(|p| x[r * k + p] * w[j * k + p]).sum::<f64>()
        })
        .collect()
}

#[test]
fn packed_weights_read_back_their_rounded_values() {
    let mut rng = StdRng::seed_from_u64(31);
    // Off the 32-column panels, the 32-deep bf16 padding and the f32 depth blocks.
    let w = uniform(&mut rng, &[45, 67]);
    let f32_packed = w.packed_for_linear(DType::F32).unwrap();
    assert!(f32_packed.is_packed() && !w.is_packed());
    assert_eq!(
        (f32_packed.shape(), f32_packed.dtype()),
        (&[45, 67][..], DType::F32)
    );
    assert_eq!(
        f32_packed.values::<f32>().unwrap(),
        w.values::<f32>().unwrap()
    );

    let rounded = w.to_dtype(DType::BF16);
    for source in [&w, &rounded] {
        let packed = source.packed_for_linear(DType::BF16).unwrap();
        assert_eq!(
            (packed.shape(), packed.dtype()),
            (&[45, 67][..], DType::BF16)
        );
        assert_eq!(packed.numel(), 45 * 67);
        assert_eq!(
            packed.values::<bf16>().unwrap(),
            rounded.values::<bf16>().unwrap(),
            "from {:?}",
            source.dtype()
        );
        assert_eq!(&packed, &rounded);
    }
}

#[test]
fn a_linear_layer_multiplies_by_the_packing_it_is_held_as() {
    let mut rng = StdRng::seed_from_u64(32);
    let (m, n, k) = (9, 45, 67);
    let (x, w, b) = (
        uniform(&mut rng, &[m, k]),
        uniform(&mut rng, &[n, k]),
        uniform(&mut rng, &[n]),
    );
    let as_f64 = |t: &Tensor| t.to_vec::<f64>();
    for dtype in [DType::F32, DType::BF16] {
        let packed = w.packed_for_linear(dtype).unwrap();
        let plain = w.to_dtype(dtype);
        let y = ops::linear(
            &x,
            &packed,
            Some(&b),
            Activation::Identity,
            WeightUse::Constant,
        )
        .unwrap();
        let y_plain = ops::linear(
            &x,
            &plain,
            Some(&b),
            Activation::Identity,
            WeightUse::Constant,
        )
        .unwrap();
        assert_eq!(y.to_vec::<f32>(), y_plain.to_vec::<f32>(), "{dtype:?}");
        // Against f64 of the operands as the GEMM sees them (x rounded to bf16 for a bf16
        // weight): only the f32 accumulation differs, (k + 2)·ε·Σ|x||w| at most.
        let x_seen = if dtype == DType::BF16 {
            as_f64(&x.to_dtype(DType::BF16))
        } else {
            as_f64(&x)
        };
        let w_seen = as_f64(&plain);
        let want = reference(&x_seen, &w_seen, &as_f64(&b), m, n, k);
        let abs_x: Vec<f64> = x_seen.iter().map(|v| v.abs()).collect();
        let abs_w: Vec<f64> = w_seen.iter().map(|v| v.abs()).collect();
        let bound = reference(
            &abs_x,
            &abs_w,
            &as_f64(&b).iter().map(|v| v.abs()).collect::<Vec<_>>(),
            m,
            n,
            k,
        );
        for (i, (got, want)) in y.to_vec::<f64>().iter().zip(&want).enumerate() {
            let tol = (k as f64 + 2.0) * f32::EPSILON as f64 * bound[i];
            assert!(
                (got - want).abs() <= tol,
                "{dtype:?} [{i}]: {got} vs {want} (±{tol})"
            );
        }
    }
}

#[test]
fn a_packed_weight_reshaped_or_written_is_a_plain_tensor() {
    let mut rng = StdRng::seed_from_u64(33);
    let w = uniform(&mut rng, &[45, 67]);
    let packed = w.packed_for_linear(DType::BF16).unwrap();
    let rounded = w.to_dtype(DType::BF16);

    // Viewed as [67, 45] it multiplies from its values, as the plain tensor of that shape does.
    let x = uniform(&mut rng, &[5, 45]);
    let linear = |w: Tensor| {
        ops::linear(
            &x,
            &w.reshape(&[67, 45]).unwrap(),
            None,
            Activation::Identity,
            WeightUse::Constant,
        )
        .unwrap()
        .to_vec::<f32>()
    };
    assert_eq!(linear(packed.clone()), linear(rounded.clone()));

    // A write makes owned storage; a clone keeps the packing and the old values.
    let mut written = packed.clone();
    written.values_mut::<bf16>().unwrap()[0] = bf16::from_f32(3.0);
    assert!(!written.is_packed() && packed.is_packed());
    assert_eq!(written.values::<bf16>().unwrap()[0], bf16::from_f32(3.0));
    assert_eq!(
        packed.values::<bf16>().unwrap(),
        rounded.values::<bf16>().unwrap()
    );
}

#[test]
fn packing_refuses_what_is_not_a_float_linear_weight() {
    let vector = Tensor::from_vec(&[4], vec![1.0f32; 4]).unwrap();
    let err = vector
        .packed_for_linear(DType::BF16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2-D"), "{err}");
    let ids = Tensor::from_vec(&[2, 2], vec![1i32, 2, 3, 4]).unwrap();
    let err = ids.packed_for_linear(DType::BF16).unwrap_err().to_string();
    assert!(err.contains("I32"), "{err}");
    let matrix = Tensor::from_vec(&[2, 2], vec![1.0f32; 4]).unwrap();
    let err = matrix
        .packed_for_linear(DType::F64)
        .unwrap_err()
        .to_string();
    assert!(err.contains("F64"), "{err}");
}
