//! `ops::add_assign`, the in-place sum that accumulates gradients: the bits of `ops::add`, and
//! copy-on-write for storage that something else still holds.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_tensor::{ops, DType, Tensor};

#[test]
fn add_assign_gives_the_bits_of_add_and_leaves_a_shared_buffer_alone() {
    let mut rng = StdRng::seed_from_u64(3);
    for n in [1, 17, 100_003] {
        let values = |rng: &mut StdRng| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let a = Tensor::from_vec(&[n], values(&mut rng)).unwrap();
        let b = Tensor::from_vec(&[n], values(&mut rng)).unwrap();
        let want = ops::add(&a, &b).unwrap();
        let before: Vec<f32> = a.values::<f32>().unwrap().to_vec();
        // `held` shares `a`'s storage, as a gradient passed on to two inputs does.
        let held = a.clone();
        let mut acc = a;
        ops::add_assign(&mut acc, &b).unwrap();
        assert_eq!(
            acc.values::<f32>().unwrap(),
            want.values::<f32>().unwrap(),
            "n={n}"
        );
        assert_eq!(
            held.values::<f32>().unwrap(),
            before.as_slice(),
            "n={n}: the other holder's values changed"
        );
    }
}

#[test]
fn add_assign_refuses_mismatched_operands() {
    let mut acc = Tensor::zeros(&[2, 3], DType::F32);
    for (x, what) in [
        (Tensor::zeros(&[3, 2], DType::F32), "[3, 2]"),
        (Tensor::zeros(&[2, 3], DType::F64), "F64"),
    ] {
        let err = ops::add_assign(&mut acc, &x).unwrap_err().to_string();
        assert!(err.contains(what), "{err:?} should name {what}");
    }
}
