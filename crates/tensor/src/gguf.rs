//! Reading GGUF (version 3), llama.cpp's model format: a header (magic `GGUF`, u32 version, u64
//! tensor count, u64 metadata count), typed key/value metadata, one info record per tensor (name,
//! dims innermost first, ggml type, offset), then the data section, which starts at the next
//! multiple of `general.alignment` (default 32) after the infos; each offset is relative to it.
//!
//! The file is memory-mapped and parsed as a hostile input: every count, length, dims product and
//! offset is checked against the bytes actually present, with checked arithmetic, before anything
//! is reserved or read, so a lying header gets an error naming the file, the field or tensor and
//! the problem, never a panic or a huge allocation. Tensors of types F32, F16, BF16, Q4_0, Q4_1
//! and Q8_0 dequantize to f32 exactly as ggml defines them (`d * q + m` in f32, as gguf-py does);
//! a file holding any other type is rejected when opened, naming the type and the tensor.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::{Result, Tensor, TensorError};

const MAGIC: &[u8; 4] = b"GGUF";
const SUPPORTED_VERSION: u32 = 3;
const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays nest at most this deep: enough for any real file, and it keeps a hostile file
/// (each level costs only 12 bytes) from overflowing the stack through the recursive reader.
const MAX_ARRAY_NESTING: usize = 16;

/// The metadata value types, by their id in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies: a string is at least its u64 length, an
    /// array at least its element type and u64 count. Bounds a count before anything is reserved.
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array, stored by element type so that a long array of bytes costs bytes, not a
/// [`Value`] each.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<Array>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Value {
    /// The value as an unsigned integer, whichever integer type holds it (writers differ: the
    /// same key is u32 in one file and u64 or i32 in another); `None` for a negative or non-integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => v.try_into().ok(),
            Value::I16(v) => v.try_into().ok(),
            Value::I32(v) => v.try_into().ok(),
            Value::I64(v) => v.try_into().ok(),
            _ => None,
        }
    }

    /// The value as a float, from F32 or F64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A short description for error messages: the type, and the value when it is small.
    pub fn describe(&self) -> String {
        match self {
            Value::String(s) if s.len() <= 64 => format!("string {s:?}"),
            Value::String(s) => format!("string of {} bytes", s.len()),
            Value::Array(a) => format!("array of {} elements", a.len()),
            scalar => format!("{scalar:?}"),
        }
    }
}

/// The tensor types this reader dequantizes, by their ggml type id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
        }
    }

    /// (elements per block, bytes per block).
    fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            // f16 scale + 32 nibbles; f16 scale + f16 minimum + 32 nibbles; f16 scale + 32 i8.
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// The name of a ggml type id this reader does not dequantize, for its error message.
fn unsupported_type_name(id: u32) -> &'static str {
    match id {
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown to this reader",
    }
}

/// One tensor's record: where its bytes are and what they hold.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// As stored: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Relative to the start of the data section.
    pub offset: u64,
    pub byte_len: u64,
}

impl TensorInfo {
    /// The row-major shape, outermost first (the stored dims reversed): a GGUF `[576, 49152]`
    /// embedding is a `[49152, 576]` tensor.
    pub fn shape(&self) -> Vec<usize> {
        // Fits: the element count was checked to fit the file when the info was read.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file: its metadata and tensor infos parsed and validated, its data mapped.
pub struct Gguf {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Maps the file at `path` and validates its whole header; every error names the path.
    pub fn open(path: &Path) -> Result<Gguf> {
        let io_error = |source| TensorError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: the map is read-only and private to this struct. As with any mapped file,
        // another process truncating it while it is open would fault the reads; model files are
        // not rewritten in place by our tools (every writer here renames a new file into place).
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        let header = parse_header(&map, path)?;
        Ok(Gguf {
            path: path.to_path_buf(),
            map,
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_start: header.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, detail: impl Into<String>) -> TensorError {
        TensorError::Gguf {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The value at `key`, or an error naming the missing key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.error(format!("metadata key `{key}` is missing")))
    }

    /// The value at `key` as `convert` reads it, or an error naming the key, the `expected` kind
    /// and what the key holds instead.
    fn require_as<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T> {
        let value = self.require(key)?;
        convert(value).ok_or_else(|| {
            self.error(format!(
                "metadata key `{key}` should be {expected}, found {}",
                value.describe()
            ))
        })
    }

    /// The unsigned integer at `key`, whichever integer type holds it.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.require_as(key, "a non-negative integer", Value::as_u64)
    }

    /// The float at `key` (F32 or F64).
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.require_as(key, "a float", Value::as_f64)
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.require_as(key, "a string", Value::as_str)
    }

    pub fn require_array(&self, key: &str) -> Result<&Array> {
        self.require_as(key, "an array", |value| match value {
            Value::Array(array) => Some(array),
            _ => None,
        })
    }

    /// The tensor's bytes as stored (validated to lie inside the data section when opened).
    fn raw_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_start + info.offset) as usize;
        &self.map[start..start + info.byte_len as usize]
    }

    /// The tensor's values dequantized to f32, in stored (row-major) order.
    pub fn dequantize(&self, info: &TensorInfo) -> Vec<f32> {
        dequantize(info.ggml_type, self.raw_bytes(info))
    }

    /// The named tensor as an f32 [`Tensor`] of its row-major shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| self.error(format!("tensor `{name}` is not in the file")))?;
        Tensor::from_vec(&info.shape(), self.dequantize(info))
    }
}

/// The 32 4-bit values of a block: element j is the low nibble of byte j, element j + 16 its
/// high nibble.
fn nibbles(qs: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let low = qs.iter().map(|&b| b & 0x0f);
    let high = qs.iter().map(|&b| b >> 4);
    low.chain(high)
}

/// Dequantizes whole blocks of `ggml_type` (the caller guarantees `bytes` is a whole number of them).
fn dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let (block_len, block_bytes) = ggml_type.block();
    let (block_len, block_bytes) = (block_len as usize, block_bytes as usize);
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * block_len);
    let half_at = |block: &[u8], at: usize| f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
    for block in bytes.chunks_exact(block_bytes) {
        match ggml_type {
            GgmlType::F32 => out.push(f32::from_le_bytes(block.try_into().expect("4 bytes"))),
            GgmlType::F16 => out.push(half_at(block, 0)),
            GgmlType::BF16 => out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32()),
            GgmlType::Q4_0 => {
                let d = half_at(block, 0);
                out.extend(nibbles(&block[2..]).map(|q| (f32::from(q) - 8.0) * d));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (half_at(block, 0), half_at(block, 2));
                out.extend(nibbles(&block[4..]).map(|q| f32::from(q) * d + m));
            }
            GgmlType::Q8_0 => {
                let d = half_at(block, 0);
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
    }
    out
}

/// An empty Vec with room for `count` elements, but never more than `bytes_left` bytes of them:
/// an element in memory (a `String`, an `Array`) can be larger than its smallest encoding, and a
/// reservation must not outgrow the file; the Vec grows only as elements are actually read.
fn reserve_within<T>(count: usize, bytes_left: u64) -> Vec<T> {
    let fit = usize::try_from(bytes_left).unwrap_or(usize::MAX) / std::mem::size_of::<T>().max(1);
    Vec::with_capacity(count.min(fit))
}

struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
}

/// Reads little-endian fields from the mapped bytes; every read is bounds-checked and names
/// what it was reading when the file ends too early.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, detail: String) -> TensorError {
        TensorError::Gguf {
            path: self.path.to_path_buf(),
            detail,
        }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, len: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if len > self.remaining() {
            return Err(self.error(format!(
                "truncated: {} needs {len} bytes at offset {} but the file ends at {}",
                what(),
                self.pos,
                self.bytes.len()
            )));
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > self.remaining() {
            return Err(self.error(format!(
                "truncated or corrupt: {}: string length {len} at offset {} runs past the end of \
                 the file ({} bytes left)",
                what(),
                self.pos - 8,
                self.remaining()
            )));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.error(format!("{}: string is not UTF-8: {e}", what())))
    }

    /// A count of items that each take at least `min_size` bytes, checked against what is left.
    fn count(&mut self, min_size: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let count = self.u64(what)?;
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|needed| needed <= self.remaining());
        if !fits {
            return Err(self.error(format!(
                "truncated or corrupt: {} is {count} (at offset {at}), but {} bytes are left, \
                 room for at most {} items of at least {min_size} bytes",
                what(),
                self.remaining(),
                self.remaining() / min_size
            )));
        }
        Ok(count as usize)
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<ValueType> {
        let at = self.pos;
        let id = self.u32(&|| format!("the value type of {}", what()))?;
        ValueType::from_id(id).ok_or_else(|| {
            self.error(format!(
                "{}: unknown value type {id} at offset {at} (known: 0 to 12)",
                what()
            ))
        })
    }

    fn value(&mut self, value_type: ValueType, what: &dyn Fn() -> String) -> Result<Value> {
        Ok(match value_type {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::Bool => Value::Bool(self.bool(what)?),
            ValueType::String => Value::String(self.string(what)?),
            ValueType::Array => Value::Array(self.array_value(what, 0)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
        })
    }

    fn bool(&mut self, what: &dyn Fn() -> String) -> Result<bool> {
        match self.array::<1>(what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(self.error(format!(
                "{}: bool byte {other} at offset {} is neither 0 nor 1",
                what(),
                self.pos - 1
            ))),
        }
    }

    /// An array: element type, u64 count, then the elements (arrays nest up to a fixed depth).
    fn array_value(&mut self, what: &dyn Fn() -> String, depth: usize) -> Result<Array> {
        if depth >= MAX_ARRAY_NESTING {
            return Err(self.error(format!(
                "{}: arrays nest deeper than {MAX_ARRAY_NESTING} levels",
                what()
            )));
        }
        let element_type = self.value_type(what)?;
        let count = self.count(element_type.min_size(), &|| {
            format!("the element count of {}", what())
        })?;
        let element = |i: usize| move || format!("element {i} of {}", what());
        // Reads `count` elements with `$read`, `$r` being the reader and `$w` the element's label.
        macro_rules! elements {
            ($variant:ident, |$r:ident, $w:ident| $read:expr) => {{
                let mut values = reserve_within(count, self.remaining());
                for i in 0..count {
                    let $w = &element(i);
                    let $r = &mut *self;
                    values.push($read?);
                }
                Array::$variant(values)
            }};
        }
        Ok(match element_type {
            ValueType::U8 => elements!(U8, |r, w| r.array::<1>(w).map(|b| b[0])),
            ValueType::I8 => elements!(I8, |r, w| r.array(w).map(i8::from_le_bytes)),
            ValueType::U16 => elements!(U16, |r, w| r.array(w).map(u16::from_le_bytes)),
            ValueType::I16 => elements!(I16, |r, w| r.array(w).map(i16::from_le_bytes)),
            ValueType::U32 => elements!(U32, |r, w| r.u32(w)),
            ValueType::I32 => elements!(I32, |r, w| r.array(w).map(i32::from_le_bytes)),
            ValueType::F32 => elements!(F32, |r, w| r.array(w).map(f32::from_le_bytes)),
            ValueType::Bool => elements!(Bool, |r, w| r.bool(w)),
            ValueType::String => elements!(String, |r, w| r.string(w)),
            ValueType::Array => elements!(Array, |r, w| r.array_value(w, depth + 1)),
            ValueType::U64 => elements!(U64, |r, w| r.u64(w)),
            ValueType::I64 => elements!(I64, |r, w| r.array(w).map(i64::from_le_bytes)),
            ValueType::F64 => elements!(F64, |r, w| r.array(w).map(f64::from_le_bytes)),
        })
    }

    fn tensor_info(&mut self, index: usize) -> Result<TensorInfo> {
        let name = self.string(&|| format!("the name of tensor info {index}"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = self.u32(&|| format!("the dimension count of {}", what()))?;
        if n_dims > MAX_DIMS {
            return Err(self.error(format!(
                "{}: {n_dims} dimensions, more than ggml's {MAX_DIMS}",
                what()
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(&|| format!("dimension {d} of {}", what()))?);
        }
        let type_at = self.pos;
        let type_id = self.u32(&|| format!("the type of {}", what()))?;
        let offset = self.u64(&|| format!("the data offset of {}", what()))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
            self.error(format!(
                "{}: tensor type {type_id} ({}) at offset {type_at} is not supported \
                 (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)",
                what(),
                unsupported_type_name(type_id)
            ))
        })?;
        let (block_len, block_bytes) = ggml_type.block();
        let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        // The byte count must fit the file; this also bounds the element count (every type
        // stores at least one byte per 32 elements), and with it the f32 output.
        let byte_len = elements
            .map(|n| n / block_len)
            .and_then(|blocks| blocks.checked_mul(block_bytes))
            .filter(|&len| len <= self.bytes.len() as u64)
            .ok_or_else(|| {
                self.error(format!(
                    "{}: dims {dims:?} of {} need more bytes than the whole {}-byte file",
                    what(),
                    ggml_type.name(),
                    self.bytes.len()
                ))
            })?;
        if dims.first().is_some_and(|&inner| inner % block_len != 0) {
            return Err(self.error(format!(
                "{}: inner dimension {} is not a multiple of the {} block size {block_len}",
                what(),
                dims[0],
                ggml_type.name()
            )));
        }
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            byte_len,
        })
    }
}

fn parse_header(bytes: &[u8], path: &Path) -> Result<Header> {
    let mut reader = Reader {
        bytes,
        pos: 0,
        path,
    };
    let magic = reader.array::<4>(&|| "the magic `GGUF`".to_string())?;
    if &magic != MAGIC {
        return Err(reader.error(format!(
            "not a GGUF file: it starts with {magic:02x?}, not the magic `GGUF`"
        )));
    }
    let version = reader.u32(&|| "the version".to_string())?;
    if version != SUPPORTED_VERSION {
        let hint = if version.swap_bytes() == SUPPORTED_VERSION {
            " (a big-endian file?)"
        } else {
            ""
        };
        return Err(reader.error(format!(
            "GGUF version {version}{hint} is not supported (only version {SUPPORTED_VERSION})"
        )));
    }
    // The smallest tensor info is an empty name, n_dims, type and offset: 8 + 4 + 4 + 8 bytes;
    // the smallest metadata entry an empty key, a type and one byte.
    let tensor_count_at = reader.pos;
    let tensor_count = reader.u64(&|| "the tensor count".to_string())?;
    let metadata_count = reader.count(8 + 4 + 1, &|| "the metadata count".to_string())?;
    let mut metadata = BTreeMap::new();
    for index in 0..metadata_count {
        let key = reader.string(&|| format!("the key of metadata entry {index}"))?;
        let what = || format!("metadata key `{key}`");
        let value_type = reader.value_type(&what)?;
        let value = reader.value(value_type, &what)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(reader.error(format!("metadata key `{key}` appears twice")));
        }
    }
    let min_tensor_info = 8 + 4 + 4 + 8;
    let fits = tensor_count
        .checked_mul(min_tensor_info)
        .is_some_and(|needed| needed <= reader.remaining());
    if !fits {
        return Err(reader.error(format!(
            "truncated or corrupt: the tensor count is {tensor_count} (at offset \
             {tensor_count_at}), but the {} bytes after the metadata hold at most {} tensor infos",
            reader.remaining(),
            reader.remaining() / min_tensor_info
        )));
    }
    let mut tensors = reserve_within(tensor_count as usize, reader.remaining());
    let mut names = HashSet::new();
    for index in 0..tensor_count as usize {
        let info = reader.tensor_info(index)?;
        if !names.insert(info.name.clone()) {
            return Err(reader.error(format!("tensor `{}` appears twice", info.name)));
        }
        tensors.push(info);
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(reader.error(format!(
                "`{ALIGNMENT_KEY}` must be a u32 power of two, found {}",
                other.describe()
            )))
        }
    };
    let header_end = reader.pos as u64;
    let data_start = header_end.next_multiple_of(alignment);
    let file_len = bytes.len() as u64;
    let data_len = file_len.saturating_sub(data_start);
    for info in &tensors {
        if info.offset % alignment != 0 {
            return Err(reader.error(format!(
                "tensor `{}`: data offset {} is not a multiple of the alignment {alignment}",
                info.name, info.offset
            )));
        }
        let fits = info
            .offset
            .checked_add(info.byte_len)
            .is_some_and(|end| end <= data_len);
        if !fits {
            return Err(reader.error(format!(
                "truncated: tensor `{}` ({} bytes at data offset {}) runs past the end of the \
                 {data_len}-byte data section (file {file_len} bytes, data from {data_start})",
                info.name, info.byte_len, info.offset
            )));
        }
    }
    let mut extents: Vec<&TensorInfo> = tensors.iter().filter(|t| t.byte_len > 0).collect();
    extents.sort_unstable_by_key(|t| t.offset);
    for pair in extents.windows(2) {
        if pair[1].offset < pair[0].offset + pair[0].byte_len {
            return Err(reader.error(format!(
                "tensors `{}` (data offset {}, {} bytes) and `{}` (data offset {}) overlap",
                pair[0].name, pair[0].offset, pair[0].byte_len, pair[1].name, pair[1].offset
            )));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
