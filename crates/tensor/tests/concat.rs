//! `Tensor::concat`: joining along the first dimension, and what it refuses.

use scalpel_tensor::{DType, Tensor};

#[test]
fn concat_joins_rows_in_order() {
    let a = Tensor::from_vec(&[1, 2, 2], vec![1.0f64, 2.0, 3.0, 4.0]).unwrap();
    let b = Tensor::from_vec(&[2, 2, 2], (5..13).map(f64::from).collect()).unwrap();
    let joined = Tensor::concat(&[a, b]).unwrap();
    assert_eq!(joined.shape(), &[3, 2, 2]);
    let want: Vec<f64> = (1..13).map(f64::from).collect();
    assert_eq!(joined.values::<f64>().unwrap(), want.as_slice());
}

#[test]
fn concat_refuses_mismatched_parts() {
    let rows = Tensor::zeros(&[2, 3], DType::F32);
    let wider = Tensor::zeros(&[2, 4], DType::F32);
    let other_dtype = Tensor::zeros(&[2, 3], DType::F64);
    for (parts, what) in [
        (vec![rows.clone(), wider], "[2, 4]"),
        (vec![rows.clone(), other_dtype], "F64"),
        (vec![], "no tensors"),
        (vec![Tensor::scalar(1.0f32)], "scalars"),
    ] {
        let err = Tensor::concat(&parts).unwrap_err().to_string();
        assert!(err.contains(what), "{err:?} should name {what}");
    }
}
