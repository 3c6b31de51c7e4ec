//! `Tensor::concat` and `Tensor::rows`: joining and slicing along the first dimension, and what
//! they refuse.

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

#[test]
fn rows_copies_a_slice_that_concat_reassembles() {
    let t = Tensor::from_vec(&[4, 3], (0..12).map(i64::from).collect()).unwrap();
    let (head, tail) = (t.rows(0..1).unwrap(), t.rows(1..4).unwrap());
    assert_eq!(head.shape(), &[1, 3]);
    assert_eq!(
        tail.values::<i64>().unwrap(),
        &(3..12).collect::<Vec<i64>>()[..]
    );
    assert_eq!(Tensor::concat(&[head, tail]).unwrap(), t);
    assert_eq!(t.rows(2..2).unwrap().shape(), &[0, 3]);
    let err = t.rows(3..5).unwrap_err().to_string();
    assert!(err.contains("3..5") && err.contains("of 4"), "{err}");
}
