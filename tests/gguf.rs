//! The GGUF reader on small files built by `common::gguf_writer`: every metadata type, alignment,
//! dequantization of each supported type against values worked out from the format's definition,
//! and one test per kind of malformed or hostile input (each a clear error naming the problem).

use crate::common;

use std::path::{Path, PathBuf};

use common::gguf_writer::{array_bytes, string_bytes, tensor_type, value_type, GgufWriter};
use common::scratch;
use half::{bf16, f16};
use scalpel::tensor::gguf::{Array, GgmlType, Gguf, Value};

fn write(test: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch(&format!("gguf-{test}")).join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open(test: &str, file: &GgufWriter) -> Gguf {
    let path = write(test, &file.bytes());
    Gguf::open(&path).unwrap_or_else(|e| panic!("{test}: {e}"))
}

/// Opening must fail with a message naming the file and containing every one of `needles`.
fn open_error(test: &str, bytes: &[u8], needles: &[&str]) -> String {
    let path = write(test, bytes);
    let message = match Gguf::open(&path) {
        Ok(_) => panic!("{test}: a bad file opened"),
        Err(e) => e.to_string(),
    };
    common::assert_error_says(test, &message, &path, needles);
    message
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// Every value type once, an empty array and an array of arrays of strings.
#[test]
fn metadata_of_every_type_reads_back() {
    let nested = {
        let inner = |words: &[&str]| {
            let elements: Vec<u8> = words.iter().flat_map(|w| string_bytes(w)).collect();
            array_bytes(value_type::STRING, words.len() as u64, &elements)
        };
        let mut elements = inner(&["a", "bc"]);
        elements.extend(inner(&[]));
        elements.extend(inner(&["ü"]));
        array_bytes(value_type::ARRAY, 3, &elements)
    };
    let mut file = GgufWriter::default();
    file.raw("u8", value_type::U8, vec![250])
        .raw("i8", value_type::I8, (-5i8).to_le_bytes().to_vec())
        .raw("u16", value_type::U16, 60000u16.to_le_bytes().to_vec())
        .raw("i16", value_type::I16, (-30000i16).to_le_bytes().to_vec())
        .u32("u32", 4_000_000_000)
        .raw("i32", value_type::I32, (-7i32).to_le_bytes().to_vec())
        .f32("f32", 1e-5)
        .bool("bool", true)
        .string("string", "héllo")
        .raw("u64", value_type::U64, u64::MAX.to_le_bytes().to_vec())
        .raw("i64", value_type::I64, i64::MIN.to_le_bytes().to_vec())
        .raw("f64", value_type::F64, 0.1f64.to_le_bytes().to_vec())
        .i32s("i32s", &[1, -2, 3])
        .raw(
            "empty",
            value_type::ARRAY,
            array_bytes(value_type::F64, 0, &[]),
        )
        .raw("nested", value_type::ARRAY, nested);
    let gguf = open("metadata", &file);
    let m = &gguf.metadata;
    assert_eq!(gguf.version, 3);
    assert_eq!(m["u8"], Value::U8(250));
    assert_eq!(m["i8"], Value::I8(-5));
    assert_eq!(m["u16"], Value::U16(60000));
    assert_eq!(m["i16"], Value::I16(-30000));
    assert_eq!(m["u32"], Value::U32(4_000_000_000));
    assert_eq!(m["i32"], Value::I32(-7));
    assert_eq!(m["f32"], Value::F32(1e-5));
    assert_eq!(m["bool"], Value::Bool(true));
    assert_eq!(m["string"], Value::String("héllo".into()));
    assert_eq!(m["u64"], Value::U64(u64::MAX));
    assert_eq!(m["i64"], Value::I64(i64::MIN));
    assert_eq!(m["f64"], Value::F64(0.1));
    assert_eq!(m["i32s"], Value::Array(Array::I32(vec![1, -2, 3])));
    assert_eq!(m["empty"], Value::Array(Array::F64(vec![])));
    let strings = |v: &[&str]| Array::String(v.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        m["nested"],
        Value::Array(Array::Array(vec![
            strings(&["a", "bc"]),
            strings(&[]),
            strings(&["ü"])
        ]))
    );
    assert_eq!(gguf.require_u64("u8").unwrap(), 250);
    assert!(gguf.require_u64("i8").is_err(), "a negative is no count");
    let wrong = gguf.require_str("u32").unwrap_err().to_string();
    assert!(
        wrong.contains("`u32`") && wrong.contains("should be a string"),
        "{wrong}"
    );
    let missing = gguf.require("absent").unwrap_err().to_string();
    assert!(missing.contains("`absent` is missing"), "{missing}");
}

/// One block of each quantized type with known scales and quants, and the float types; the
/// expected values follow the format's definitions (element j is the low nibble of byte j, element
/// j + 16 its high nibble; Q4_0 w = (q - 8)·d, Q4_1 w = q·d + m, Q8_0 w = q·d).
#[test]
fn every_supported_type_dequantizes() {
    let nibbles: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let nibble_values: Vec<f32> = (0..16).chain((0..16).rev()).map(|q| q as f32).collect();
    let mut q4_0 = f16_bytes(0.5).to_vec();
    q4_0.extend(&nibbles);
    let mut q4_1 = f16_bytes(0.25).to_vec();
    q4_1.extend(f16_bytes(-1.5));
    q4_1.extend(&nibbles);
    let q8_quants: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    let mut q8_0 = f16_bytes(0.125).to_vec();
    q8_0.extend(q8_quants.iter().map(|&q| q as u8));
    // The second block of Q8_0 has another scale: each block uses its own.
    q8_0.extend(f16_bytes(-2.0));
    q8_0.extend(q8_quants.iter().map(|&q| q as u8));
    let floats = [0.0f32, -1.5, 3.25e-3, 65504.0];
    let mut file = GgufWriter::default();
    file.tensor("q4_0", &[32], tensor_type::Q4_0, q4_0)
        .tensor("q4_1", &[32], tensor_type::Q4_1, q4_1)
        .tensor("q8_0", &[32, 2], tensor_type::Q8_0, q8_0)
        .f32_tensor("f32", &[2, 2], &floats)
        .tensor(
            "f16",
            &[4],
            tensor_type::F16,
            floats.iter().flat_map(|&v| f16_bytes(v)).collect(),
        )
        .tensor(
            "bf16",
            &[4],
            tensor_type::BF16,
            floats
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        );
    let gguf = open("dequantize", &file);
    let values = |name: &str| gguf.tensor(name).unwrap().to_vec::<f32>();
    let q4_0: Vec<f32> = nibble_values.iter().map(|q| (q - 8.0) * 0.5).collect();
    assert_eq!(values("q4_0"), q4_0);
    let q4_1: Vec<f32> = nibble_values.iter().map(|q| q * 0.25 - 1.5).collect();
    assert_eq!(values("q4_1"), q4_1);
    let q8: Vec<f32> = [0.125f32, -2.0]
        .iter()
        .flat_map(|&d| q8_quants.iter().map(move |&q| q as f32 * d))
        .collect();
    assert_eq!(values("q8_0"), q8);
    assert_eq!(gguf.tensor("q8_0").unwrap().shape(), &[2, 32]);
    assert_eq!(values("f32"), floats);
    assert_eq!(gguf.tensor("f32").unwrap().shape(), &[2, 2]);
    let f16_want: Vec<f32> = floats.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(values("f16"), f16_want);
    let bf16_want: Vec<f32> = floats.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(values("bf16"), bf16_want);
    assert_eq!(gguf.tensor_info("q4_1").unwrap().ggml_type, GgmlType::Q4_1);
    let absent = gguf.tensor("absent").unwrap_err().to_string();
    assert!(absent.contains("`absent` is not in the file"), "{absent}");
}

/// The data section starts at the alignment `general.alignment` names (default 32), and tensor
/// offsets are relative to it.
#[test]
fn alignment_places_the_data_section() {
    for alignment in [None, Some(64u32), Some(1)] {
        let mut file = GgufWriter::default();
        if let Some(a) = alignment {
            file.u32("general.alignment", a);
            file.alignment = a.into();
        }
        file.f32_tensor("a", &[3], &[1.0, 2.0, 3.0])
            .f32_tensor("b", &[1], &[4.0]);
        let bytes = file.bytes();
        let gguf = open(&format!("alignment-{alignment:?}"), &file);
        let want = alignment.map_or(32, u64::from);
        assert_eq!(gguf.alignment, want);
        assert_eq!(gguf.tensor("a").unwrap().to_vec::<f32>(), [1.0, 2.0, 3.0]);
        assert_eq!(gguf.tensor("b").unwrap().to_vec::<f32>(), [4.0]);
        // `b` sits at the first aligned offset after `a`'s 12 bytes.
        assert_eq!(
            gguf.tensor_info("b").unwrap().offset,
            12u64.next_multiple_of(want)
        );
        assert_eq!(bytes.len() as u64 % want, 4 % want);
    }
    let mut file = GgufWriter::default();
    file.u32("general.alignment", 48);
    open_error(
        "alignment-48",
        &file.bytes(),
        &["general.alignment", "power of two", "U32(48)"],
    );
    let mut file = GgufWriter::default();
    file.u32("general.alignment", 0);
    open_error(
        "alignment-0",
        &file.bytes(),
        &["general.alignment", "power of two"],
    );
}

fn small_valid_file() -> GgufWriter {
    let mut file = GgufWriter::default();
    file.string("general.architecture", "llama")
        .strings("tokenizer.ggml.tokens", &["a".into(), "b".into()])
        .f32_tensor("first", &[4, 2], &[1.0; 8])
        .f32_tensor("second", &[8], &[2.0; 8]);
    file
}

/// Cutting a valid file anywhere gives an error (never a panic); in the header it says what was
/// being read, and in the data it names the tensor that runs past the end.
#[test]
fn truncated_files_are_errors() {
    let bytes = small_valid_file().bytes();
    assert!(Gguf::open(&write("truncated-whole", &bytes)).is_ok());
    for len in 0..bytes.len() {
        let path = write("truncated-any", &bytes[..len]);
        let error = Gguf::open(&path)
            .expect_err("a truncated file opened")
            .to_string();
        assert!(error.contains("truncated"), "cut at {len}: {error}");
    }
    open_error("truncated-magic", &bytes[..2], &["truncated", "the magic"]);
    // The first key (8 + 20 bytes) starts after the 24-byte header; 26 bytes pass the check of
    // the metadata count (2 entries of at least 13 bytes), and the key itself is cut.
    open_error(
        "truncated-key",
        &bytes[..50],
        &["truncated", "key of metadata entry 0"],
    );
    open_error(
        "truncated-data",
        &bytes[..bytes.len() - 1],
        &["truncated", "tensor `second`", "runs past the end"],
    );
}

#[test]
fn unsupported_tensor_types_are_named() {
    let mut file = GgufWriter::default();
    file.tensor(
        "blk.0.ffn_up.weight",
        &[256],
        tensor_type::Q4_K,
        vec![0; 144],
    );
    open_error(
        "type-q4k",
        &file.bytes(),
        &[
            "tensor `blk.0.ffn_up.weight`",
            "type 12 (Q4_K)",
            "not supported",
        ],
    );
    let mut file = GgufWriter::default();
    file.tensor("odd", &[4], 77, vec![0; 4]);
    open_error(
        "type-77",
        &file.bytes(),
        &["tensor `odd`", "type 77 (unknown to this reader)"],
    );
}

/// Patches the u64 at `at` in a valid file's bytes.
fn with_u64(mut bytes: Vec<u8>, at: usize, value: u64) -> Vec<u8> {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    bytes
}

/// Counts and lengths that claim more than the file holds are refused before anything is
/// reserved: with u64::MAX an allocation would abort the process, so passing means no allocation.
#[test]
fn hostile_counts_and_lengths_are_refused() {
    let bytes = small_valid_file().bytes();
    // Header: magic, version, tensor count at 8, metadata count at 16.
    open_error(
        "hostile-metadata-count",
        &with_u64(bytes.clone(), 16, u64::MAX),
        &["metadata count is 18446744073709551615", "bytes are left"],
    );
    open_error(
        "hostile-tensor-count",
        &with_u64(bytes.clone(), 8, 1 << 40),
        &["tensor count is 1099511627776", "at most"],
    );
    // The first key's length at 24.
    open_error(
        "hostile-key-length",
        &with_u64(bytes.clone(), 24, u64::MAX - 3),
        &[
            "key of metadata entry 0",
            "string length 18446744073709551612",
            "runs past the end",
        ],
    );
    // The tokens array: key `general.architecture` (8 + 20 bytes), type, string value (8 + 5),
    // then key `tokenizer.ggml.tokens` (8 + 21), type, element type, count.
    let count_at = 24 + 28 + 4 + 13 + 29 + 4 + 4;
    open_error(
        "hostile-array-count",
        &with_u64(bytes.clone(), count_at, u64::MAX / 4),
        &[
            "element count of metadata key `tokenizer.ggml.tokens`",
            "bytes are left",
        ],
    );
    open_error(
        "hostile-element-length",
        &with_u64(bytes.clone(), count_at + 8, 1 << 50),
        &[
            "element 0 of metadata key `tokenizer.ggml.tokens`",
            "string length 1125899906842624",
        ],
    );

    let mut huge = GgufWriter::default();
    huge.tensor(
        "huge",
        &[1 << 32, 1 << 32, 1 << 16],
        tensor_type::F32,
        vec![],
    );
    open_error(
        "hostile-dims-overflow",
        &huge.bytes(),
        &["tensor `huge`", "need more bytes than the whole"],
    );
    let mut big = GgufWriter::default();
    big.tensor("big", &[1 << 20, 1 << 20], tensor_type::Q8_0, vec![]);
    open_error(
        "hostile-dims-big",
        &big.bytes(),
        &["tensor `big`", "Q8_0", "need more bytes"],
    );

    let mut beyond = small_valid_file();
    beyond.tensors[1].offset = Some(u64::MAX - 31);
    open_error(
        "hostile-offset",
        &beyond.bytes(),
        &["tensor `second`", "runs past the end"],
    );
}

#[test]
fn malformed_headers_are_named() {
    let valid = small_valid_file().bytes();
    let mut bad_magic = valid.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    open_error("magic", &bad_magic, &["not a GGUF file", "magic"]);
    let mut v2 = valid.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    open_error("version-2", &v2, &["GGUF version 2 is not supported"]);
    let mut big_endian = valid.clone();
    big_endian[4..8].copy_from_slice(&3u32.to_be_bytes());
    open_error("version-be", &big_endian, &["big-endian"]);

    let cases: Vec<(&str, GgufWriter, Vec<&str>)> = vec![
        (
            "duplicate-key",
            {
                let mut f = GgufWriter::default();
                f.u32("k", 1)
                    .push_raw("k", value_type::U32, 2u32.to_le_bytes().to_vec());
                f
            },
            vec!["metadata key `k` appears twice"],
        ),
        (
            "unknown-value-type",
            {
                let mut f = GgufWriter::default();
                f.raw("k", 13, vec![0; 8]);
                f
            },
            vec!["metadata key `k`", "unknown value type 13"],
        ),
        (
            "bad-bool",
            {
                let mut f = GgufWriter::default();
                f.raw("flag", value_type::BOOL, vec![2]);
                f
            },
            vec!["metadata key `flag`", "bool byte 2"],
        ),
        (
            "not-utf8",
            {
                let mut f = GgufWriter::default();
                f.raw("bad", value_type::STRING, {
                    let mut s = 2u64.to_le_bytes().to_vec();
                    s.extend([0xff, 0xfe]);
                    s
                });
                f
            },
            vec!["metadata key `bad`", "not UTF-8"],
        ),
        (
            "deep-nesting",
            {
                let mut payload = array_bytes(value_type::U8, 0, &[]);
                for _ in 0..20 {
                    payload = array_bytes(value_type::ARRAY, 1, &payload);
                }
                let mut f = GgufWriter::default();
                f.raw("deep", value_type::ARRAY, payload);
                f
            },
            vec!["metadata key `deep`", "nest deeper than 16"],
        ),
        (
            "duplicate-tensor",
            {
                let mut f = GgufWriter::default();
                f.f32_tensor("t", &[1], &[1.0])
                    .f32_tensor("t", &[1], &[2.0]);
                f
            },
            vec!["tensor `t` appears twice"],
        ),
        (
            "five-dims",
            {
                let mut f = GgufWriter::default();
                f.f32_tensor("t", &[1, 1, 1, 1, 1], &[1.0]);
                f
            },
            vec!["tensor `t`", "5 dimensions"],
        ),
        (
            "partial-block",
            {
                let mut f = GgufWriter::default();
                f.tensor("q", &[16, 2], tensor_type::Q8_0, vec![0; 34]);
                f
            },
            vec!["tensor `q`", "inner dimension 16", "block size 32"],
        ),
        (
            "misaligned",
            {
                let mut f = small_valid_file();
                f.tensors[1].offset = Some(40);
                f
            },
            vec!["tensor `second`", "offset 40", "alignment 32"],
        ),
        (
            "overlap",
            {
                let mut f = small_valid_file();
                f.tensors[1].offset = Some(0);
                f
            },
            vec!["tensors `first`", "`second`", "overlap"],
        ),
    ];
    for (name, file, needles) in cases {
        open_error(name, &file.bytes(), &needles);
    }
}

/// The real SmolLM2 file (fetched by scripts/fetch_smollm2.sh): its header as gguf-py reads it.
#[test]
fn real_file_header() {
    let path = common::smollm2_gguf();
    let gguf = Gguf::open(&path).unwrap();
    assert_eq!(gguf.version, 3);
    assert_eq!(gguf.metadata.len(), 33);
    assert_eq!(gguf.tensors.len(), 272);
    assert_eq!(gguf.alignment, 32);
    let count = |t: GgmlType| gguf.tensors.iter().filter(|i| i.ggml_type == t).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );
    let embedding = gguf.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embedding.ggml_type, GgmlType::Q8_0);
    assert_eq!(embedding.dims, [576, 49152]);
    assert_eq!(embedding.shape(), [49152, 576]);
    // Offsets as gguf-py reports them (absolute in the file).
    let data_start = 1785664;
    assert_eq!(embedding.offset, 1785664 - data_start);
    assert_eq!(
        gguf.tensor_info("blk.0.attn_q.weight").unwrap().offset,
        33806656 - data_start
    );
    assert_eq!(gguf.require_str("general.architecture").unwrap(), "llama");
    assert_eq!(gguf.require_str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(
        gguf.require_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert!(Path::new(&path).exists());
}
