//! Zero-copy loading: tensors read in place from the file's memory map where dtype and
//! alignment allow, copied where they do not; writes copy first, and the file on disk never
//! changes, even when it is replaced or removed while tensors still borrow from its map.

use std::collections::BTreeMap;
use std::fs;

use half::f16;
use scalpel_tensor::safetensors;
use scalpel_tensor::{DType, Data, Tensor};

use crate::safetensors_files::{file_bytes, scratch_dir};

fn named(tensors: Vec<(&str, Tensor)>) -> BTreeMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect()
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| i as f32 * scale - 1.5).collect()
}

#[test]
fn aligned_tensors_are_used_in_place_and_read_their_values() {
    let dir = scratch_dir("mapped_in_place");
    let path = dir.join("m.safetensors");
    let halves: Vec<f16> = [0.5f32, -2.0, 65504.0].map(f16::from_f32).to_vec();
    let saved = named(vec![
        ("a", Tensor::from_vec(&[2, 3], ramp(6, 0.25)).unwrap()),
        ("h", Tensor::from_vec(&[3], halves.clone()).unwrap()),
        // After `a`'s 24 bytes: 8-aligned (`save` writes in name order).
        ("b", Tensor::from_vec(&[2], vec![7i64, -9]).unwrap()),
        ("n", Tensor::from_vec(&[2], vec![3i32, 4]).unwrap()),
    ]);
    safetensors::save(&path, &saved, &BTreeMap::new()).unwrap();
    let loaded = safetensors::load(&path).unwrap().tensors;

    for name in ["a", "b", "h"] {
        assert!(loaded[name].is_mapped(), "{name} was copied");
    }
    // I32 widens to I64 on load: a copy by necessity.
    assert!(!loaded["n"].is_mapped());
    assert_eq!(loaded["n"].values::<i64>().unwrap(), [3, 4]);
    assert_eq!(loaded["a"].values::<f32>().unwrap(), ramp(6, 0.25));
    assert_eq!(loaded["a"].shape(), [2, 3]);
    assert_eq!(loaded["b"].values::<i64>().unwrap(), [7, -9]);
    assert_eq!(loaded["h"].values::<f16>().unwrap(), halves);
    // f16 converts to f32 (as the model loaders do) straight from the map.
    assert_eq!(
        loaded["h"].to_dtype(DType::F32).values::<f32>().unwrap(),
        [0.5, -2.0, 65504.0]
    );
    assert_eq!(loaded["a"].to_vec::<f64>()[5], -0.25);
    // Mapped and owned tensors of the same values are equal; `data` hands out an owned copy.
    assert_eq!(loaded["a"], saved["a"]);
    assert_ne!(loaded["a"], loaded["a"].to_dtype(DType::F64));
    assert!(loaded["a"].data().unwrap() == &Data::F32(ramp(6, 0.25)));
    assert!(loaded["a"].clone().into_data().unwrap() == Data::F32(ramp(6, 0.25)));
    assert_eq!(
        loaded["a"].rows(1..2).unwrap().values::<f32>().unwrap(),
        &ramp(6, 0.25)[3..]
    );
}

#[test]
fn a_write_copies_the_tensor_and_never_reaches_the_file() {
    let dir = scratch_dir("mapped_copy_on_write");
    let path = dir.join("m.safetensors");
    let saved = named(vec![("w", Tensor::from_vec(&[4], ramp(4, 1.0)).unwrap())]);
    safetensors::save(&path, &saved, &BTreeMap::new()).unwrap();
    let on_disk = fs::read(&path).unwrap();

    let mut loaded = safetensors::load(&path).unwrap().tensors;
    let shared = loaded["w"].clone();
    let w = loaded.get_mut("w").unwrap();
    w.values_mut::<f32>().unwrap()[0] = 100.0;

    assert!(!w.is_mapped(), "a written tensor owns its copy");
    assert_eq!(w.values::<f32>().unwrap(), [100.0, -0.5, 0.5, 1.5]);
    assert!(shared.is_mapped());
    assert_eq!(
        shared.values::<f32>().unwrap(),
        ramp(4, 1.0),
        "a clone kept the file's values"
    );
    assert_eq!(fs::read(&path).unwrap(), on_disk, "the file changed");
}

#[test]
fn tensors_keep_their_values_when_the_file_is_replaced_or_removed() {
    let dir = scratch_dir("mapped_replaced");
    let path = dir.join("m.safetensors");
    let first = named(vec![(
        "w",
        Tensor::from_vec(&[3], vec![1.0f32, 2.0, 3.0]).unwrap(),
    )]);
    safetensors::save(&path, &first, &BTreeMap::new()).unwrap();
    let loaded = safetensors::load(&path).unwrap().tensors;

    // A checkpoint saved over the file it was loaded from (as a resumed heal does): `save`
    // renames a new file into place, so the old inode and the map onto it stay valid.
    let second = named(vec![(
        "w",
        Tensor::from_vec(&[3], vec![-4.0f32, -5.0, -6.0]).unwrap(),
    )]);
    safetensors::save(&path, &second, &BTreeMap::new()).unwrap();
    assert_eq!(loaded["w"].values::<f32>().unwrap(), [1.0, 2.0, 3.0]);
    assert_eq!(
        safetensors::load(&path).unwrap().tensors["w"]
            .values::<f32>()
            .unwrap(),
        [-4.0, -5.0, -6.0]
    );

    fs::remove_file(&path).unwrap();
    assert_eq!(loaded["w"].values::<f32>().unwrap(), [1.0, 2.0, 3.0]);
    // Saving the still-mapped tensors writes their values, not the removed file's name.
    safetensors::save(&path, &loaded, &BTreeMap::new()).unwrap();
    assert_eq!(
        safetensors::load(&path).unwrap().tensors["w"]
            .values::<f32>()
            .unwrap(),
        [1.0, 2.0, 3.0]
    );
}

#[test]
fn a_misaligned_tensor_is_copied_with_the_right_values() {
    let dir = scratch_dir("mapped_misaligned");
    let path = dir.join("m.safetensors");
    // The header padded so that the data section starts at 3 mod 8: the f16 at an odd offset,
    // the f32 after it at 1 mod 4 (writers pad to 8; a hand-made file need not).
    let header = r#"{"h":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"w":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}}"#;
    let pad = (3 + 8 - (8 + header.len()) % 8) % 8;
    let padded = format!("{header}{}", " ".repeat(pad));
    assert_eq!((8 + padded.len()) % 8, 3);
    let mut data = f16::from_f32(0.25).to_le_bytes().to_vec();
    data.extend([3.5f32, -7.0].iter().flat_map(|x| x.to_le_bytes()));
    fs::write(&path, file_bytes(&padded, &data)).unwrap();

    let loaded = safetensors::load(&path).unwrap().tensors;
    assert!(!loaded["h"].is_mapped());
    assert!(!loaded["w"].is_mapped());
    assert_eq!(loaded["h"].values::<f16>().unwrap(), [f16::from_f32(0.25)]);
    assert_eq!(loaded["w"].values::<f32>().unwrap(), [3.5, -7.0]);
}

#[test]
fn a_mapped_weight_packs_once_for_all_its_clones_and_frees_the_packing_with_them() {
    use scalpel_tensor::cpu::gemm_weights::{cached, packed};
    let dir = scratch_dir("mapped_packing");
    let path = dir.join("w.safetensors");
    let saved = named(vec![(
        "w",
        Tensor::from_vec(&[16, 24], ramp(16 * 24, 0.01)).unwrap(),
    )]);
    safetensors::save(&path, &saved, &BTreeMap::new()).unwrap();
    let w = safetensors::load(&path)
        .unwrap()
        .tensors
        .remove("w")
        .unwrap();
    assert!(w.is_mapped());
    let packing = std::sync::Arc::downgrade(&packed(&w).expect("an f32 matrix packs"));
    let clone = w.clone();
    drop(w);
    assert!(
        cached(&clone).is_some_and(|p| std::ptr::eq(&*p, packing.as_ptr())),
        "a clone of a mapped weight finds its packing"
    );
    drop(clone);
    // Any lookup frees the entries of dropped weights.
    cached(&Tensor::zeros(&[1, 1], DType::F32));
    assert!(
        packing.upgrade().is_none(),
        "the packing outlived its weight"
    );
}
