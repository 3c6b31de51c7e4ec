//! A minimal GGUF writer for the tests: lays out the bytes by the format's definition,
//! independently of the reader, so that small valid files (and, by editing the bytes or the
//! recorded counts, invalid ones) can be built in a test.

/// The value type ids of the format.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The ggml tensor type ids used in the tests.
pub mod tensor_type {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q8_0: u32 = 8;
    pub const Q4_K: u32 = 12;
    pub const BF16: u32 = 30;
}

pub fn string_bytes(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// An array payload: element type, count, then the already-encoded elements.
pub fn array_bytes(element_type: u32, count: u64, elements: &[u8]) -> Vec<u8> {
    let mut out = element_type.to_le_bytes().to_vec();
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(elements);
    out
}

pub struct TensorEntry {
    pub name: String,
    /// Innermost first, as stored.
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
    /// The data is always laid out after the previous tensor's, at the next aligned offset; this
    /// records a different offset in the info (for files whose offsets lie).
    pub offset: Option<u64>,
}

pub struct GgufWriter {
    pub alignment: u64,
    metadata: Vec<(String, u32, Vec<u8>)>,
    pub tensors: Vec<TensorEntry>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter {
            alignment: 32,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

impl GgufWriter {
    /// Sets a metadata entry to a value already encoded, in place when the key is there.
    pub fn raw(&mut self, key: &str, value_type: u32, payload: Vec<u8>) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _, _)| k == key) {
            Some(entry) => *entry = (key.to_string(), value_type, payload),
            None => self.metadata.push((key.to_string(), value_type, payload)),
        }
        self
    }

    /// Appends a metadata entry even when the key is already there (for files that repeat one).
    pub fn push_raw(&mut self, key: &str, value_type: u32, payload: Vec<u8>) -> &mut Self {
        self.metadata.push((key.to_string(), value_type, payload));
        self
    }

    pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.raw(key, value_type::U32, v.to_le_bytes().to_vec())
    }

    pub fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.raw(key, value_type::F32, v.to_le_bytes().to_vec())
    }

    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.raw(key, value_type::BOOL, vec![v as u8])
    }

    pub fn string(&mut self, key: &str, v: &str) -> &mut Self {
        self.raw(key, value_type::STRING, string_bytes(v))
    }

    pub fn strings(&mut self, key: &str, values: &[String]) -> &mut Self {
        let elements: Vec<u8> = values.iter().flat_map(|s| string_bytes(s)).collect();
        let payload = array_bytes(value_type::STRING, values.len() as u64, &elements);
        self.raw(key, value_type::ARRAY, payload)
    }

    pub fn i32s(&mut self, key: &str, values: &[i32]) -> &mut Self {
        let elements: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let payload = array_bytes(value_type::I32, values.len() as u64, &elements);
        self.raw(key, value_type::ARRAY, payload)
    }

    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            data,
            offset: None,
        });
        self
    }

    pub fn f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, tensor_type::F32, data)
    }

    /// The whole file.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value_type, payload) in &self.metadata {
            out.extend_from_slice(&string_bytes(key));
            out.extend_from_slice(&value_type.to_le_bytes());
            out.extend_from_slice(payload);
        }
        let mut next = 0u64;
        let mut placed = Vec::new();
        for t in &self.tensors {
            placed.push(next);
            let offset = t.offset.unwrap_or(next);
            next = (next + t.data.len() as u64).next_multiple_of(self.alignment);
            out.extend_from_slice(&string_bytes(&t.name));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.type_id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        let data_start = (out.len() as u64).next_multiple_of(self.alignment);
        out.resize(data_start as usize, 0);
        for (t, offset) in self.tensors.iter().zip(placed) {
            let at = (data_start + offset) as usize;
            if out.len() < at + t.data.len() {
                out.resize(at + t.data.len(), 0);
            }
            out[at..at + t.data.len()].copy_from_slice(&t.data);
        }
        out
    }
}
