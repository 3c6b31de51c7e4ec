//! Loading and saving the safetensors format: an 8-byte little-endian header length, a JSON
//! header mapping each tensor name to `{dtype, shape, data_offsets}` (plus an optional
//! `__metadata__` string map), then the raw little-endian tensor bytes.
//!
//! The parser is written by hand rather than taken from the `safetensors` crate so that every
//! rejection names the exact problem and tensor. Loading keeps F32, F64, F16, BF16 and I64 as
//! stored; the narrower integer dtypes (I8, I16, I32, U8, U16, U32, BOOL) widen losslessly to I64,
//! because checkpoints use them for ids and masks; anything else (U64, F8_*, ...) is an error.
//! Unlike the reference implementation, the reader tolerates unused bytes between tensors; it
//! never accepts overlapping ones.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::json;

use crate::{DType, Data, Result, Tensor, TensorError};

const METADATA_KEY: &str = "__metadata__";

/// The named tensors of one file plus its `__metadata__` string map, names sorted.
#[derive(Debug)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: BTreeMap<String, String>,
}

/// Reads the file at `path`, straight into each tensor's storage; every error names the path.
pub fn load(path: &Path) -> Result<TensorFile> {
    let io_error = |source| TensorError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let file_len = file.metadata().map_err(io_error)?.len();
    read_file(&mut file, file_len, path)
}

/// Parses a whole safetensors file held in memory; `source` only labels errors.
pub fn parse(bytes: &[u8], source: &Path) -> Result<TensorFile> {
    read_file(&mut Cursor::new(bytes), bytes.len() as u64, source)
}

/// Where one validated tensor lies in the data section and how to decode it.
struct Extent {
    name: String,
    shape: Vec<usize>,
    decode: Decode,
    start: u64,
    end: u64,
}

/// Validates the whole header before reading any tensor data, then reads the tensors in file
/// order so that a file is read sequentially, once.
fn read_file(reader: &mut (impl Read + Seek), file_len: u64, source: &Path) -> Result<TensorFile> {
    let invalid = |detail: String| TensorError::SafeTensors {
        path: source.to_path_buf(),
        detail,
    };
    let io_error = |source_error| TensorError::Io {
        path: source.to_path_buf(),
        source: source_error,
    };
    if file_len < 8 {
        return Err(invalid(format!(
            "truncated: {file_len} bytes is shorter than the 8-byte header length"
        )));
    }
    let mut length_prefix = [0; 8];
    reader.read_exact(&mut length_prefix).map_err(io_error)?;
    let header_len = u64::from_le_bytes(length_prefix);
    if header_len > file_len - 8 {
        return Err(invalid(format!(
            "header length {header_len} runs past the end of the file ({} bytes follow the \
             length); the file is truncated or not safetensors",
            file_len - 8
        )));
    }
    let mut header = vec![0; header_len as usize];
    reader.read_exact(&mut header).map_err(io_error)?;
    let header =
        std::str::from_utf8(&header).map_err(|e| invalid(format!("header is not UTF-8: {e}")))?;
    let Header { entries, metadata } = parse_header(header).map_err(invalid)?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;

    let mut extents = Vec::with_capacity(entries.len());
    for (
        name,
        TensorEntry {
            dtype,
            shape,
            data_offsets,
        },
    ) in entries
    {
        let &[start, end] = data_offsets.as_slice() else {
            return Err(invalid(format!(
                "tensor `{name}`: data_offsets must be [start, end], got {data_offsets:?}"
            )));
        };
        let (element_size, decode) = stored_dtype(&dtype).ok_or_else(|| {
            invalid(format!(
                "tensor `{name}` has unsupported dtype {dtype} (F32, F64, F16, BF16 and I64 load \
                 as stored; I8, I16, I32, U8, U16, U32 and BOOL widen to I64)"
            ))
        })?;
        let byte_len = shape
            .iter()
            .try_fold(element_size, |acc, &dim| acc.checked_mul(dim));
        let byte_len = byte_len.ok_or_else(|| {
            invalid(format!(
                "tensor `{name}`: shape {shape:?} of {dtype} overflows the byte count"
            ))
        })?;
        if end < start {
            return Err(invalid(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] end before they start"
            )));
        }
        if end > data_len {
            return Err(invalid(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] are out of range of the \
                 {data_len}-byte data section"
            )));
        }
        if end - start != byte_len as u64 {
            return Err(invalid(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] span {} bytes but {dtype} x \
                 {shape:?} needs {byte_len}",
                end - start
            )));
        }
        extents.push(Extent {
            name,
            shape,
            decode,
            start,
            end,
        });
    }

    extents.sort_unstable_by_key(|extent| (extent.start, extent.end));
    // Empty tensors occupy no bytes, so they cannot overlap anything.
    let occupied: Vec<&Extent> = extents
        .iter()
        .filter(|extent| extent.start < extent.end)
        .collect();
    for pair in occupied.windows(2) {
        let (first, second) = (pair[0], pair[1]);
        if second.start < first.end {
            return Err(invalid(format!(
                "tensors `{}` [{}, {}] and `{}` [{}, {}] overlap in the data section",
                first.name, first.start, first.end, second.name, second.start, second.end
            )));
        }
    }

    let mut tensors = BTreeMap::new();
    for Extent {
        name,
        shape,
        decode,
        start,
        ..
    } in extents
    {
        reader
            .seek(SeekFrom::Start(data_start + start))
            .map_err(io_error)?;
        let data = decode(reader, shape.iter().product()).map_err(io_error)?;
        tensors.insert(name, Tensor::from_data(&shape, data)?);
    }
    Ok(TensorFile { tensors, metadata })
}

/// Writes `tensors` (in name order) and `metadata` to `path` in the standard format, atomically:
/// an interrupted save leaves any previous file at `path` untouched.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    if tensors.contains_key(METADATA_KEY) {
        return Err(TensorError::SafeTensors {
            path: path.to_path_buf(),
            detail: format!(
                "`{METADATA_KEY}` is reserved for the metadata map and cannot name a tensor"
            ),
        });
    }
    // Device tensors are read back first; host tensors are written from where they are.
    let host: BTreeMap<String, std::borrow::Cow<Tensor>> = tensors
        .iter()
        .map(|(name, t)| {
            let t = if t.is_host() {
                std::borrow::Cow::Borrowed(t)
            } else {
                std::borrow::Cow::Owned(t.to_host()?)
            };
            Ok((name.clone(), t))
        })
        .collect::<Result<_>>()?;
    let header = header_json(&host, metadata);
    write_atomically(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(header.as_bytes())?;
        host.values().try_for_each(|tensor| {
            out.write_all(tensor.data().expect("read back above").as_bytes())
        })
    })
}

#[derive(Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: Vec<u64>,
}

/// The header's entries in file order, so that duplicates can be reported rather than merged.
struct Header {
    entries: Vec<(String, TensorEntry)>,
    metadata: BTreeMap<String, String>,
}

fn parse_header(json: &str) -> Result<Header, String> {
    let mut current_entry = None;
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let parsed = deserializer
        .deserialize_map(HeaderVisitor {
            current_entry: &mut current_entry,
        })
        .and_then(|header| deserializer.end().map(|()| header));
    parsed.map_err(|e| {
        let problem = if e.is_data() {
            "bad header"
        } else {
            "header is not valid JSON"
        };
        match current_entry {
            Some(name) => format!("{problem}: entry `{name}`: {e}"),
            None => format!("{problem}: {e}"),
        }
    })
}

/// Reads the top-level object entry by entry, recording which entry is being read so that a
/// type error deep inside one can be reported against its tensor name.
struct HeaderVisitor<'a> {
    current_entry: &'a mut Option<String>,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = Header;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object mapping tensor names to {dtype, shape, data_offsets}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Header, A::Error> {
        let mut header = Header {
            entries: Vec::new(),
            metadata: BTreeMap::new(),
        };
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom(format!("duplicate entry `{name}`")));
            }
            *self.current_entry = Some(name.clone());
            if name == METADATA_KEY {
                header.metadata = map.next_value::<Option<_>>()?.unwrap_or_default();
            } else {
                header.entries.push((name, map.next_value()?));
            }
            *self.current_entry = None;
        }
        Ok(header)
    }
}

/// Reads `len` elements of one stored dtype from the current position.
type Decode = fn(&mut dyn Read, usize) -> io::Result<Data>;

/// Element size and decoder for a header dtype name.
fn stored_dtype(name: &str) -> Option<(usize, Decode)> {
    // Reading into a fresh Vec of the element type gives correct alignment whatever the
    // file's layout, with a single copy.
    fn read_vec<T: bytemuck::Pod>(reader: &mut dyn Read, len: usize) -> io::Result<Vec<T>> {
        let mut values = bytemuck::zeroed_vec(len);
        reader.read_exact(bytemuck::cast_slice_mut(&mut values))?;
        Ok(values)
    }
    fn widen<T: bytemuck::Pod + Into<i64>>(reader: &mut dyn Read, len: usize) -> io::Result<Data> {
        Ok(Data::I64(
            read_vec::<T>(reader, len)?
                .into_iter()
                .map(Into::into)
                .collect(),
        ))
    }
    Some(match name {
        "F32" => (4, |r, n| read_vec(r, n).map(Data::F32)),
        "F64" => (8, |r, n| read_vec(r, n).map(Data::F64)),
        "F16" => (2, |r, n| read_vec(r, n).map(Data::F16)),
        "BF16" => (2, |r, n| read_vec(r, n).map(Data::BF16)),
        "I64" => (8, |r, n| read_vec(r, n).map(Data::I64)),
        "I32" => (4, widen::<i32>),
        "U32" => (4, widen::<u32>),
        "I16" => (2, widen::<i16>),
        "U16" => (2, widen::<u16>),
        "I8" => (1, widen::<i8>),
        "U8" | "BOOL" => (1, widen::<u8>),
        _ => return None,
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I32 => "I32",
        DType::I64 => "I64",
    }
}

/// The JSON header, space-padded to a multiple of 8 bytes so that the data section starts
/// 8-byte aligned, as the reference writer does.
fn header_json(
    tensors: &BTreeMap<String, std::borrow::Cow<Tensor>>,
    metadata: &BTreeMap<String, String>,
) -> String {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(METADATA_KEY.to_owned(), json!(metadata));
    }
    let mut offset = 0;
    for (name, tensor) in tensors {
        let end = offset + tensor.numel() * tensor.dtype().size_in_bytes();
        let entry = json!({"dtype": dtype_name(tensor.dtype()), "shape": tensor.shape(), "data_offsets": [offset, end]});
        header.insert(name.clone(), entry);
        offset = end;
    }
    let mut json = serde_json::Value::Object(header).to_string();
    let padded_len = json.len().next_multiple_of(8);
    json.push_str(&" ".repeat(padded_len - json.len()));
    json
}

/// Writes through a uniquely named temporary file in the destination directory, fsyncs it, then
/// renames it over `path`, so readers see either the old file or the complete new one.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>,
) -> Result<()> {
    // Distinguishes concurrent saves within one process; the pid distinguishes processes.
    static SAVE_COUNT: AtomicU64 = AtomicU64::new(0);
    let io_error = |source: io::Error| TensorError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io_error(io::ErrorKind::InvalidInput.into()))?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let temp_path = dir.join(format!(
        ".{}.{}-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        SAVE_COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp_path)
        .map_err(io_error)?;
    let mut out = BufWriter::new(file);
    let written = write(&mut out)
        .and_then(|()| out.into_inner().map_err(io::IntoInnerError::into_error))
        .and_then(|file| file.sync_all())
        .and_then(|()| fs::rename(&temp_path, path));
    if let Err(source) = written {
        // Best effort: the error being reported matters more than a failure to clean up.
        let _ = fs::remove_file(&temp_path);
        return Err(io_error(source));
    }
    // Make the rename itself durable. Best effort: the new file is already complete and in
    // place, and some platforms cannot open directories.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}
