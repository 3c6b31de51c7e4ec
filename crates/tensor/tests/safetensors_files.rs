//! Safetensors loading and saving: round trips, a byte layout built independently of `save`,
//! one test per kind of malformed input, and the atomicity of `save`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use scalpel_tensor::safetensors::{self, TensorFile};
use scalpel_tensor::{DType, Tensor, TensorError};

/// A fresh, empty directory for one test under Cargo's per-target scratch space.
pub(crate) fn scratch_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("safetensors")
        .join(test);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A file laid out by hand: little-endian header length, the header text, the data section.
pub(crate) fn file_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn parse(bytes: &[u8]) -> scalpel_tensor::Result<TensorFile> {
    safetensors::parse(bytes, Path::new("fixture.safetensors"))
}

/// The message of the error `parse` must return; it always names the source.
fn parse_error(bytes: &[u8]) -> String {
    let message = parse(bytes)
        .expect_err("malformed input was accepted")
        .to_string();
    assert!(
        message.contains("fixture.safetensors"),
        "error does not name the source: {message}"
    );
    message
}

fn assert_mentions(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            message.contains(needle),
            "expected {needle:?} in error: {message}"
        );
    }
}

fn sample_tensors() -> BTreeMap<String, Tensor> {
    let tensors = [
        (
            "f32",
            Tensor::from_vec(
                &[2, 3],
                vec![1.5f32, -2.0, 0.0, f32::MAX, f32::MIN_POSITIVE, -0.0],
            )
            .unwrap(),
        ),
        (
            "f64",
            Tensor::from_vec(&[3], vec![std::f64::consts::PI, -1e300, 5e-324]).unwrap(),
        ),
        (
            "f16",
            Tensor::from_vec(
                &[2, 2],
                [1.0f32, -0.5, 65504.0, 6e-8].map(f16::from_f32).to_vec(),
            )
            .unwrap(),
        ),
        (
            "bf16",
            Tensor::from_vec(
                &[4],
                [1.0f32, -3.0e38, 0.1, 7.0].map(bf16::from_f32).to_vec(),
            )
            .unwrap(),
        ),
        (
            "i64",
            Tensor::from_vec(&[1, 3], vec![0i64, i64::MIN, i64::MAX]).unwrap(),
        ),
        ("scalar", Tensor::scalar(42.0f32)),
        ("empty", Tensor::zeros(&[0, 4], DType::F32)),
        ("empty_i64", Tensor::zeros(&[3, 0], DType::I64)),
    ];
    tensors
        .into_iter()
        .map(|(name, tensor)| (name.to_owned(), tensor))
        .collect()
}

fn assert_same_tensors(actual: &BTreeMap<String, Tensor>, expected: &BTreeMap<String, Tensor>) {
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (name, tensor) in expected {
        let loaded = &actual[name];
        assert_eq!(loaded.shape(), tensor.shape(), "{name}");
        assert_eq!(loaded.dtype(), tensor.dtype(), "{name}");
        // Bitwise, so that -0.0 and NaN payloads count too.
        assert_eq!(
            loaded.data().unwrap().as_bytes(),
            tensor.data().unwrap().as_bytes(),
            "{name}"
        );
    }
}

#[test]
fn round_trip_keeps_every_dtype_shape_and_value() {
    let dir = scratch_dir("round_trip");
    let path = dir.join("all.safetensors");
    let tensors = sample_tensors();
    let metadata = BTreeMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("note".to_owned(), "é \"q\"".to_owned()),
    ]);
    safetensors::save(&path, &tensors, &metadata).unwrap();

    let loaded = safetensors::load(&path).unwrap();
    assert_same_tensors(&loaded.tensors, &tensors);
    assert_eq!(loaded.metadata, metadata);
    assert_eq!(
        dir_entries(&dir),
        ["all.safetensors"],
        "no temporary file is left behind"
    );
}

#[test]
fn saved_file_has_the_standard_layout() {
    let dir = scratch_dir("standard_layout");
    let path = dir.join("layout.safetensors");
    let tensors = sample_tensors();
    safetensors::save(&path, &tensors, &BTreeMap::new()).unwrap();
    let bytes = fs::read(&path).unwrap();

    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0, "header is padded to a multiple of 8");
    let header_text = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    assert!(header_text.starts_with('{'));
    let header: serde_json::Value = serde_json::from_str(header_text).unwrap();
    assert!(
        header.get("__metadata__").is_none(),
        "empty metadata is omitted, as Python does"
    );
    let data = &bytes[8 + header_len..];

    // Tensors are stored back to back in name order and cover the data section exactly.
    let mut offset = 0;
    for (name, tensor) in &tensors {
        let entry = &header[name.as_str()];
        let dtype = format!("{:?}", tensor.dtype());
        assert_eq!(entry["dtype"], dtype.as_str(), "{name}");
        assert_eq!(entry["shape"], serde_json::json!(tensor.shape()), "{name}");
        let end = offset + tensor.data().unwrap().as_bytes().len();
        assert_eq!(
            entry["data_offsets"],
            serde_json::json!([offset, end]),
            "{name}"
        );
        assert_eq!(
            &data[offset..end],
            tensor.data().unwrap().as_bytes(),
            "{name}"
        );
        offset = end;
    }
    assert_eq!(offset, data.len());

    // The reference implementation (the Rust core of Python's `safetensors`) accepts it.
    let reference = ::safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(reference.len(), tensors.len());
    for (name, tensor) in &tensors {
        let view = reference.tensor(name).unwrap();
        assert_eq!(view.shape(), tensor.shape(), "{name}");
        assert_eq!(view.data(), tensor.data().unwrap().as_bytes(), "{name}");
    }
}

#[test]
fn reads_a_file_laid_out_by_hand() {
    // As Python writes it: `__metadata__` first, entries not in data order. The header is
    // padded so the data section starts at an odd address, to exercise unaligned reads.
    let mut header = concat!(
        r#"{"__metadata__":{"format":"pt"},"#,
        r#""weight":{"dtype":"F32","shape":[2,2],"data_offsets":[24,40]},"#,
        r#""position_ids":{"dtype":"I64","shape":[1,3],"data_offsets":[0,24]},"#,
        r#""half":{"dtype":"BF16","shape":[2],"data_offsets":[40,44]},"#,
        r#""ids32":{"dtype":"I32","shape":[2],"data_offsets":[44,52]},"#,
        r#""mask":{"dtype":"BOOL","shape":[3],"data_offsets":[52,55]}}"#
    )
    .to_owned();
    while (8 + header.len()) % 8 != 1 {
        header.push(' ');
    }
    let mut data = Vec::new();
    for id in [0i64, 1, 2] {
        data.extend_from_slice(&id.to_le_bytes());
    }
    for w in [0.25f32, -1.0, 3.5, 1e-3] {
        data.extend_from_slice(&w.to_le_bytes());
    }
    data.extend_from_slice(&[0x80, 0x3f, 0x00, 0xc0]); // bf16 1.0 and -2.0
    for id in [-7i32, 100_000] {
        data.extend_from_slice(&id.to_le_bytes());
    }
    data.extend_from_slice(&[1, 0, 1]);

    let file = parse(&file_bytes(&header, &data)).unwrap();
    assert_eq!(
        file.metadata,
        BTreeMap::from([("format".to_owned(), "pt".to_owned())])
    );
    assert_eq!(
        file.tensors.keys().collect::<Vec<_>>(),
        ["half", "ids32", "mask", "position_ids", "weight"]
    );

    let weight = &file.tensors["weight"];
    assert_eq!((weight.shape(), weight.dtype()), (&[2, 2][..], DType::F32));
    assert_eq!(weight.values::<f32>().unwrap(), [0.25, -1.0, 3.5, 1e-3]);
    let position_ids = &file.tensors["position_ids"];
    assert_eq!(
        (position_ids.shape(), position_ids.dtype()),
        (&[1, 3][..], DType::I64)
    );
    assert_eq!(position_ids.values::<i64>().unwrap(), [0, 1, 2]);
    assert_eq!(
        file.tensors["half"].values::<bf16>().unwrap(),
        [bf16::from_f32(1.0), bf16::from_f32(-2.0)]
    );
    // Narrow integer dtypes widen to I64.
    assert_eq!(
        file.tensors["ids32"].values::<i64>().unwrap(),
        [-7, 100_000]
    );
    assert_eq!(file.tensors["mask"].values::<i64>().unwrap(), [1, 0, 1]);
}

#[test]
fn accepts_null_metadata_and_an_empty_file() {
    let file = parse(&file_bytes(r#"{"__metadata__":null}"#, &[])).unwrap();
    assert!(file.tensors.is_empty() && file.metadata.is_empty());
    let file = parse(&file_bytes("{}      ", &[])).unwrap();
    assert!(file.tensors.is_empty() && file.metadata.is_empty());
}

#[test]
fn unsupported_dtype_names_tensor_and_dtype() {
    let header = r#"{"fp8":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(header, &[0, 0])),
        &["`fp8`", "unsupported dtype F8_E4M3"],
    );
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let path = scratch_dir("missing_file").join("absent.safetensors");
    let error = safetensors::load(&path).unwrap_err();
    assert!(matches!(error, TensorError::Io { .. }), "{error:?}");
    assert_mentions(&error.to_string(), &["absent.safetensors"]);
}

#[test]
fn file_shorter_than_length_prefix_is_truncated() {
    assert_mentions(&parse_error(&[1, 0, 0]), &["truncated", "3 bytes"]);
    assert_mentions(&parse_error(&[]), &["truncated"]);
}

#[test]
fn header_length_beyond_file_is_rejected() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    assert_mentions(
        &parse_error(&bytes),
        &["header length 1000", "past the end"],
    );
    assert_mentions(
        &parse_error(&u64::MAX.to_le_bytes()),
        &[
            "header length 18446744073709551615",
            "limit of 100000000 bytes",
        ],
    );
}

#[test]
fn header_that_is_not_utf8_is_rejected() {
    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    assert_mentions(&parse_error(&bytes), &["not UTF-8"]);
}

#[test]
fn header_that_is_not_json_is_rejected() {
    assert_mentions(
        &parse_error(&file_bytes("{\"a\": ", &[])),
        &["not valid JSON"],
    );
    assert_mentions(
        &parse_error(&file_bytes("{} trailing", &[])),
        &["not valid JSON"],
    );
}

#[test]
fn header_with_wrong_field_types_is_rejected() {
    let shape_as_string = r#"{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(shape_as_string, &[0; 8])),
        &["bad header", "`w`", "invalid type"],
    );
    let missing_offsets = r#"{"w":{"dtype":"F32","shape":[2]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(missing_offsets, &[0; 8])),
        &["`w`", "data_offsets"],
    );
    let negative_offset = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(negative_offset, &[0; 8])),
        &["`w`", "invalid value"],
    );
    let three_offsets = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(three_offsets, &[0; 8])),
        &["`w`", "more than 2 values", "[start, end]"],
    );
    let one_offset = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(one_offset, &[0; 8])),
        &["`w`", "must be [start, end]"],
    );
    let unknown_dtype = r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(unknown_dtype, &[0; 8])),
        &["`w`", "unknown variant `Q4`"],
    );
    let numeric_metadata = r#"{"__metadata__":{"epoch":3}}"#;
    assert_mentions(
        &parse_error(&file_bytes(numeric_metadata, &[])),
        &["`__metadata__`", "expected a string"],
    );
    assert_mentions(
        &parse_error(&file_bytes("[1, 2]", &[])),
        &["bad header", "expected an object"],
    );
}

#[test]
fn offsets_out_of_range_name_the_tensor() {
    let header = r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(header, &[0; 8])),
        &["`w`", "out of range", "8-byte data section"],
    );
}

#[test]
fn overlapping_tensors_are_rejected() {
    let header = concat!(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"#,
        r#""b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#
    );
    assert_mentions(
        &parse_error(&file_bytes(header, &[0; 12])),
        &["overlap", "`a`", "`b`"],
    );
}

#[test]
fn byte_length_must_match_dtype_and_shape() {
    let header = r#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,8]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(header, &[0; 8])),
        &["`w`", "span 8 bytes", "needs 12"],
    );
}

#[test]
fn offsets_ending_before_they_start_are_rejected() {
    let header = r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#;
    assert_mentions(
        &parse_error(&file_bytes(header, &[0; 8])),
        &["`w`", "end before they start"],
    );
}

#[test]
fn shape_product_overflow_is_rejected() {
    let huge = usize::MAX / 2 + 1;
    let header = format!(r#"{{"w":{{"dtype":"F32","shape":[{huge},2],"data_offsets":[0,8]}}}}"#);
    assert_mentions(
        &parse_error(&file_bytes(&header, &[0; 8])),
        &["`w`", "overflows"],
    );
}

#[test]
fn duplicate_names_are_rejected() {
    let header = concat!(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
    );
    assert_mentions(
        &parse_error(&file_bytes(header, &[0; 8])),
        &["duplicate", "`w`"],
    );
}

#[test]
fn reserved_metadata_name_cannot_be_saved_as_a_tensor() {
    let dir = scratch_dir("reserved_name");
    let tensors = BTreeMap::from([("__metadata__".to_owned(), Tensor::scalar(1.0f32))]);
    let error =
        safetensors::save(&dir.join("x.safetensors"), &tensors, &BTreeMap::new()).unwrap_err();
    assert_mentions(&error.to_string(), &["__metadata__", "reserved"]);
    assert!(dir_entries(&dir).is_empty());
}

#[test]
fn save_into_missing_directory_fails_cleanly() {
    let dir = scratch_dir("missing_directory");
    let path = dir.join("not_there").join("model.safetensors");
    let error = safetensors::save(&path, &sample_tensors(), &BTreeMap::new()).unwrap_err();
    assert!(matches!(error, TensorError::Io { .. }), "{error:?}");
    assert_mentions(&error.to_string(), &["not_there", "model.safetensors"]);
    assert!(
        dir_entries(&dir).is_empty(),
        "left behind: {:?}",
        dir_entries(&dir)
    );
}

#[test]
fn save_that_fails_after_writing_removes_its_temporary_file() {
    // Renaming a file over a non-empty directory fails only after the data has been written.
    let dir = scratch_dir("failed_rename");
    let path = dir.join("model.safetensors");
    fs::create_dir(&path).unwrap();
    fs::write(path.join("keep"), b"").unwrap();
    let error = safetensors::save(&path, &sample_tensors(), &BTreeMap::new()).unwrap_err();
    assert!(matches!(error, TensorError::Io { .. }), "{error:?}");
    assert_eq!(dir_entries(&dir), ["model.safetensors"]);
    assert_eq!(dir_entries(&path), ["keep"]);
}

#[test]
fn save_replaces_an_existing_file() {
    let dir = scratch_dir("replace");
    let path = dir.join("model.safetensors");
    safetensors::save(&path, &sample_tensors(), &BTreeMap::new()).unwrap();

    let replacement = BTreeMap::from([(
        "only".to_owned(),
        Tensor::from_vec(&[2], vec![7i64, 8]).unwrap(),
    )]);
    let metadata = BTreeMap::from([("version".to_owned(), "2".to_owned())]);
    safetensors::save(&path, &replacement, &metadata).unwrap();

    let loaded = safetensors::load(&path).unwrap();
    assert_same_tensors(&loaded.tensors, &replacement);
    assert_eq!(loaded.metadata, metadata);
    assert_eq!(dir_entries(&dir), ["model.safetensors"]);
}

/// `header` over `data_len` zero bytes must be refused with an error mentioning `needles`.
fn assert_rejected(header: &str, data_len: usize, needles: &[&str]) {
    assert_mentions(
        &parse_error(&file_bytes(header, &vec![0; data_len])),
        needles,
    );
}

#[test]
fn gaps_and_trailing_bytes_are_rejected() {
    // The reference implementation requires the tensors to cover the data section exactly.
    let gap = concat!(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#
    );
    assert_rejected(gap, 12, &["`b`", "leaves a gap after `a`", "ends at 4"]);
    let trailing = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert_rejected(trailing, 12, &["cover 8 bytes", "holds 12"]);
}

#[test]
fn hostile_sizes_are_refused_before_anything_is_allocated() {
    // A shape whose byte count fits in usize but is far beyond the file: refused by the
    // offsets check, never allocated (a 16 TiB allocation would abort the test).
    let huge = 1usize << 42;
    let entry = |end: usize| {
        format!(r#"{{"w":{{"dtype":"F32","shape":[{huge}],"data_offsets":[0,{end}]}}}}"#)
    };
    assert_rejected(
        &entry(huge * 4),
        8,
        &["`w`", "out of range of the 8-byte data section"],
    );
    let needs = format!("needs {}", huge * 4);
    assert_rejected(&entry(8), 8, &["`w`", "span 8 bytes", &needs]);
    // A shape of a million dimensions is refused at the 65th, before it is stored.
    let many_dims = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{}1],"data_offsets":[0,4]}}}}"#,
        "1,".repeat(1_000_000)
    );
    assert_rejected(&many_dims, 4, &["`w`", "more than 64 values"]);
}

#[test]
fn an_empty_file_on_disk_is_truncated() {
    let path = scratch_dir("empty_file").join("empty.safetensors");
    fs::write(&path, b"").unwrap();
    let message = safetensors::load(&path).unwrap_err().to_string();
    assert_mentions(&message, &["empty.safetensors", "truncated", "0 bytes"]);
}
