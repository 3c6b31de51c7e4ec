use std::fmt;
use std::ops::Range;
use std::sync::{Arc, OnceLock, Weak};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::backend::{Device, DeviceMemory};
use crate::cpu::gemm::PackedB;
use crate::cpu::gemm_bf16::{Bf16Path, PackedBf16Weight};
use crate::cpu::gemm_weights::PackedWeight;
use crate::{DType, Element, Result, TensorError};

/// Type-erased contiguous storage.
#[derive(Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::F32(_) => DType::F32,
            Data::F64(_) => DType::F64,
            Data::F16(_) => DType::F16,
            Data::BF16(_) => DType::BF16,
            Data::I32(_) => DType::I32,
            Data::I64(_) => DType::I64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::BF16(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes, as safetensors stores them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Data::F32(v) => bytemuck::cast_slice(v),
            Data::F64(v) => bytemuck::cast_slice(v),
            Data::F16(v) => bytemuck::cast_slice(v),
            Data::BF16(v) => bytemuck::cast_slice(v),
            Data::I32(v) => bytemuck::cast_slice(v),
            Data::I64(v) => bytemuck::cast_slice(v),
        }
    }

    fn zeros(dtype: DType, len: usize) -> Data {
        match dtype {
            DType::F32 => Data::F32(vec![0.0; len]),
            DType::F64 => Data::F64(vec![0.0; len]),
            DType::F16 => Data::F16(vec![f16::ZERO; len]),
            DType::BF16 => Data::BF16(vec![bf16::ZERO; len]),
            DType::I32 => Data::I32(vec![0; len]),
            DType::I64 => Data::I64(vec![0; len]),
        }
    }
}

/// A tensor's elements: host memory, a read-only file mapping, memory on a device, or a linear
/// weight's GEMM packing. All are shared on clone. Host and mapped storage are copied on the first write to a shared buffer
/// ([`Tensor::values_mut`]; a mapping always, so the file is never written), device storage by
/// its backend's in-place updates. So a clone costs nothing, and the storage's address
/// identifies it while it lives (the CPU GEMM keys packed weights by it, `cpu::gemm_weights`).
#[derive(Clone)]
enum Storage {
    Host(Arc<Data>),
    Mapped(Arc<Mapped>),
    Device(Arc<dyn DeviceMemory>),
    Packed(Arc<PackedLinear>),
}

/// A linear layer's `[out, in]` weight held only as the packing its CPU GEMM multiplies by
/// ([`Tensor::packed_for_linear`]). Like a mapping, it is read-only: reading its values unpacks
/// a row-major copy once, and writing first turns it into owned storage.
pub(crate) struct PackedLinear {
    packing: Arc<PackedWeight>,
    dtype: DType,
    /// The row-major values, unpacked on the first call that reads them.
    copy: OnceLock<Data>,
}

impl PackedLinear {
    fn data(&self) -> &Data {
        self.copy.get_or_init(|| self.packing.unpack())
    }
}

/// Elements read in place from a read-only memory map of a file (see `safetensors::load`): the
/// bytes are the little-endian elements, aligned for the dtype. Writing to them (`values_mut`)
/// first copies them into owned storage, so the file is never modified, and the map stays alive
/// as long as any tensor borrows from it.
pub(crate) struct Mapped {
    map: Arc<Mmap>,
    bytes: Range<usize>,
    dtype: DType,
    /// The owned copy [`Tensor::data`] hands out, made on its first call.
    copy: OnceLock<Data>,
}

impl Mapped {
    fn bytes(&self) -> &[u8] {
        &self.map[self.bytes.clone()]
    }

    fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size_in_bytes()
    }

    fn values<T: Element>(&self) -> Option<&[T]> {
        // Alignment and length were checked by `Tensor::from_mapped`.
        (T::DTYPE == self.dtype).then(|| bytemuck::cast_slice(self.bytes()))
    }

    /// An owned copy: the one [`Tensor::data`] made if there is one (taken when nothing else
    /// shares the mapping).
    fn into_owned(mapped: Arc<Mapped>) -> Data {
        match Arc::try_unwrap(mapped) {
            Ok(mut only) => only.copy.take().unwrap_or_else(|| only.to_data()),
            Err(shared) => shared
                .copy
                .get()
                .cloned()
                .unwrap_or_else(|| shared.to_data()),
        }
    }

    fn to_data(&self) -> Data {
        fn owned<T: Element>(m: &Mapped) -> Data {
            T::into_data(m.values::<T>().expect("dtype matched").to_vec())
        }
        match self.dtype {
            DType::F32 => owned::<f32>(self),
            DType::F64 => owned::<f64>(self),
            DType::F16 => owned::<f16>(self),
            DType::BF16 => owned::<bf16>(self),
            DType::I32 => owned::<i32>(self),
            DType::I64 => owned::<i64>(self),
        }
    }
}

/// A weak reference to a tensor's host or mapped storage (see [`Tensor::host_storage`]).
pub(crate) enum WeakStorage {
    Host(Weak<Data>),
    Mapped(Weak<Mapped>),
    Packed(Weak<PackedLinear>),
}

impl WeakStorage {
    /// Whether some tensor still holds the storage.
    pub(crate) fn is_alive(&self) -> bool {
        match self {
            WeakStorage::Host(w) => w.strong_count() > 0,
            WeakStorage::Mapped(w) => w.strong_count() > 0,
            WeakStorage::Packed(w) => w.strong_count() > 0,
        }
    }
}

/// A dense, contiguous, row-major tensor.
#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl PartialEq for Tensor {
    /// Host tensors (owned or mapped) compare by value; device tensors are equal when they share
    /// their memory.
    fn eq(&self, other: &Tensor) -> bool {
        fn same<T: Element + PartialEq>(a: &Tensor, b: &Tensor) -> bool {
            a.values::<T>().ok() == b.values::<T>().ok()
        }
        if self.shape != other.shape {
            return false;
        }
        match (&self.storage, &other.storage) {
            (Storage::Device(a), Storage::Device(b)) => Arc::ptr_eq(a, b),
            (Storage::Device(_), _) | (_, Storage::Device(_)) => false,
            _ if self.dtype() != other.dtype() => false,
            _ => match self.dtype() {
                DType::F32 => same::<f32>(self, other),
                DType::F64 => same::<f64>(self, other),
                DType::F16 => same::<f16>(self, other),
                DType::BF16 => same::<bf16>(self, other),
                DType::I32 => same::<i32>(self, other),
                DType::I64 => same::<i64>(self, other),
            },
        }
    }
}

fn on_device(op: &'static str, memory: &dyn DeviceMemory) -> TensorError {
    TensorError::OnDevice {
        op,
        device: memory.backend().name(),
    }
}

impl Tensor {
    /// Builds a tensor from owned values; fails if `values.len()` is not the product of `shape`.
    pub fn from_vec<T: Element>(shape: &[usize], values: Vec<T>) -> Result<Tensor> {
        Tensor::from_data(shape, T::into_data(values))
    }

    pub fn from_data(shape: &[usize], data: Data) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(TensorError::shape(
                "from_data",
                format!(
                    "shape {shape:?} holds {numel} elements but {} were given",
                    data.len()
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Host(Arc::new(data)),
        })
    }

    /// A tensor whose elements are `bytes` of `map`, used in place: the little-endian elements
    /// of `dtype`, aligned for it. `None` when they cannot be used in place (misaligned, or a
    /// big-endian host), for the caller to copy them instead; an error when the byte count is
    /// not `shape`'s.
    pub(crate) fn from_mapped(
        shape: &[usize],
        map: &Arc<Mmap>,
        bytes: Range<usize>,
        dtype: DType,
    ) -> Result<Option<Tensor>> {
        let numel: usize = shape.iter().product();
        let size = dtype.size_in_bytes();
        if bytes.end > map.len() || bytes.len() != numel * size {
            return Err(TensorError::shape(
                "from_mapped",
                format!(
                    "shape {shape:?} of {dtype:?} needs {} bytes, given {bytes:?} of a {}-byte map",
                    numel * size,
                    map.len()
                ),
            ));
        }
        let aligned = (map.as_ptr() as usize + bytes.start).is_multiple_of(size);
        if !aligned || cfg!(target_endian = "big") {
            return Ok(None);
        }
        Ok(Some(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Mapped(Arc::new(Mapped {
                map: Arc::clone(map),
                bytes,
                dtype,
                copy: OnceLock::new(),
            })),
        }))
    }

    /// Whether the elements are read in place from a file mapping (until written to).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_))
    }

    /// This `[out, in]` host weight held only as the packing the CPU's linear layers multiply
    /// by, in `dtype`: F32, or BF16 (rounded to nearest even) for the bf16 GEMM on
    /// [`Bf16Path::best`]. An inference weight then sits in memory once, in the layout its GEMM
    /// reads, instead of as its values beside a cached packing (`cpu::gemm_weights`). For
    /// everything else it is still a `[out, in]` tensor of `dtype`: the first read of its
    /// values unpacks a row-major copy (kept, as a mapping keeps its copy), a write makes it
    /// owned storage, and another shape (`reshape`) multiplies from its values. A tensor of
    /// another rank, dtype or device is an error naming it.
    pub fn packed_for_linear(&self, dtype: DType) -> Result<Tensor> {
        let op = "packed_for_linear";
        if self.rank() != 2 || !self.is_host() {
            return Err(TensorError::shape(
                op,
                format!("a linear weight is a 2-D host tensor, got {self:?}"),
            ));
        }
        let (out_f, in_f) = (self.shape[0], self.shape[1]);
        let source = match self.dtype() {
            DType::F32 | DType::BF16 if self.dtype() == dtype => self.clone(),
            held if held.is_float() => self.to_dtype(DType::F32),
            held => return Err(TensorError::DType { op, dtype: held }),
        };
        let packing = match dtype {
            DType::F32 => {
                PackedWeight::F32(PackedB::for_linear(source.values::<f32>()?, out_f, in_f))
            }
            DType::BF16 => {
                let path = Bf16Path::best();
                PackedWeight::Bf16(match source.dtype() {
                    DType::BF16 => {
                        PackedBf16Weight::pack(path, source.values::<bf16>()?, out_f, in_f)
                    }
                    _ => PackedBf16Weight::pack(path, source.values::<f32>()?, out_f, in_f),
                })
            }
            other => {
                return Err(TensorError::shape(
                    op,
                    format!("linear weights are packed in F32 or BF16, not {other:?}"),
                ))
            }
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage: Storage::Packed(Arc::new(PackedLinear {
                packing: Arc::new(packing),
                dtype,
                copy: OnceLock::new(),
            })),
        })
    }

    /// Whether the elements are held as a linear weight's packing ([`Tensor::packed_for_linear`]).
    pub fn is_packed(&self) -> bool {
        matches!(self.storage, Storage::Packed(_))
    }

    /// The packing a [`Tensor::packed_for_linear`] weight is held as, while it keeps the shape
    /// it was packed at.
    pub(crate) fn linear_packing(&self) -> Option<&Arc<PackedWeight>> {
        match &self.storage {
            Storage::Packed(p) if p.packing.shape() == (self.shape[0], self.shape[1]) => {
                Some(&p.packing)
            }
            _ => None,
        }
    }

    /// Wraps device memory holding `shape`'s elements (called by device backends).
    pub fn from_device(shape: &[usize], memory: Arc<dyn DeviceMemory>) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != memory.len() {
            return Err(TensorError::shape(
                "from_device",
                format!(
                    "shape {shape:?} holds {numel} elements but the device buffer has {}",
                    memory.len()
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Device(memory),
        })
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        let numel = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Host(Arc::new(Data::zeros(dtype, numel))),
        }
    }

    pub fn full<T: Element>(shape: &[usize], value: T) -> Tensor {
        let numel = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Host(Arc::new(T::into_data(vec![value; numel]))),
        }
    }

    pub fn scalar<T: Element>(value: T) -> Tensor {
        Tensor::full(&[], value)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of dimension `d`; negative values count from the end.
    pub fn dim(&self, d: isize) -> usize {
        let i = if d < 0 {
            self.shape.len() as isize + d
        } else {
            d
        };
        self.shape[i as usize]
    }

    pub fn numel(&self) -> usize {
        match &self.storage {
            Storage::Host(data) => data.len(),
            Storage::Mapped(mapped) => mapped.len(),
            Storage::Device(memory) => memory.len(),
            Storage::Packed(_) => self.shape.iter().product(),
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Host(data) => data.dtype(),
            Storage::Mapped(mapped) => mapped.dtype,
            Storage::Device(memory) => memory.dtype(),
            Storage::Packed(packed) => packed.dtype,
        }
    }

    /// Where the elements are.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) | Storage::Mapped(_) | Storage::Packed(_) => Device::Cpu,
            Storage::Device(memory) => Device::Accelerator(memory.backend()),
        }
    }

    /// Whether the elements are in host memory (owned, mapped or packed).
    pub fn is_host(&self) -> bool {
        !matches!(self.storage, Storage::Device(_))
    }

    /// The device memory of a device tensor.
    pub fn device_memory(&self) -> Option<&Arc<dyn DeviceMemory>> {
        match &self.storage {
            Storage::Host(_) | Storage::Mapped(_) | Storage::Packed(_) => None,
            Storage::Device(memory) => Some(memory),
        }
    }

    /// Mutable device memory, copied first (by `copy`, on its device) if another tensor shares
    /// it. `None` for a host tensor.
    pub fn device_memory_mut(
        &mut self,
        copy: impl FnOnce(&dyn DeviceMemory) -> Result<Arc<dyn DeviceMemory>>,
    ) -> Result<Option<&mut dyn DeviceMemory>> {
        let Storage::Device(memory) = &mut self.storage else {
            return Ok(None);
        };
        if Arc::get_mut(memory).is_none() {
            *memory = copy(memory.as_ref())?;
        }
        Ok(Arc::get_mut(memory))
    }

    /// A host copy of a device tensor, or a clone of a host one (a mapped one stays mapped).
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Host(_) | Storage::Mapped(_) | Storage::Packed(_) => Ok(self.clone()),
            Storage::Device(memory) => Tensor::from_data(&self.shape, memory.read()?),
        }
    }

    /// A weak handle on the host or mapped storage, and its address, which identifies it while
    /// it lives; `None` on a device.
    pub(crate) fn host_storage(&self) -> Option<(usize, WeakStorage)> {
        match &self.storage {
            Storage::Host(data) => Some((
                Arc::as_ptr(data) as *const u8 as usize,
                WeakStorage::Host(Arc::downgrade(data)),
            )),
            Storage::Mapped(mapped) => Some((
                Arc::as_ptr(mapped) as *const u8 as usize,
                WeakStorage::Mapped(Arc::downgrade(mapped)),
            )),
            Storage::Packed(packed) => Some((
                Arc::as_ptr(packed) as *const u8 as usize,
                WeakStorage::Packed(Arc::downgrade(packed)),
            )),
            Storage::Device(_) => None,
        }
    }

    /// The host elements; an error for a device tensor (see [`Tensor::to_host`]). A mapped
    /// tensor's elements are copied out on the first call (and kept): [`Tensor::values`] and
    /// [`Tensor::bytes`] read them in place.
    pub fn data(&self) -> Result<&Data> {
        match &self.storage {
            Storage::Host(data) => Ok(data.as_ref()),
            Storage::Mapped(mapped) => Ok(mapped.copy.get_or_init(|| mapped.to_data())),
            Storage::Packed(packed) => Ok(packed.data()),
            Storage::Device(memory) => Err(on_device("data", memory.as_ref())),
        }
    }

    /// The raw little-endian bytes of the host elements, as safetensors stores them; an error
    /// for a device tensor.
    pub fn bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Host(data) => Ok(data.as_bytes()),
            Storage::Mapped(mapped) => Ok(mapped.bytes()),
            Storage::Packed(packed) => Ok(packed.data().as_bytes()),
            Storage::Device(memory) => Err(on_device("bytes", memory.as_ref())),
        }
    }

    /// The host elements, read back first from a device (copied out of a mapping).
    pub fn into_data(self) -> Result<Data> {
        match self.storage {
            Storage::Host(data) => Ok(Arc::unwrap_or_clone(data)),
            Storage::Mapped(mapped) => Ok(Mapped::into_owned(mapped)),
            Storage::Packed(packed) => Ok(packed.data().clone()),
            Storage::Device(memory) => memory.read(),
        }
    }

    /// Borrows the host elements as `T`; an error names the dtype actually held, or the device.
    pub fn values<T: Element>(&self) -> Result<&[T]> {
        let values = match &self.storage {
            Storage::Host(data) => T::slice(data),
            Storage::Mapped(mapped) => mapped.values(),
            Storage::Packed(packed) => T::slice(packed.data()),
            Storage::Device(memory) => return Err(on_device("values", memory.as_ref())),
        };
        values.ok_or(TensorError::DType {
            op: "values",
            dtype: self.dtype(),
        })
    }

    /// Borrows the host elements as `T` for writing; a mapped tensor is copied into owned
    /// storage first (copy-on-write: the file is never written).
    pub fn values_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        match &self.storage {
            Storage::Mapped(mapped) => {
                self.storage = Storage::Host(Arc::new(Mapped::into_owned(Arc::clone(mapped))))
            }
            Storage::Packed(packed) => {
                self.storage = Storage::Host(Arc::new(packed.data().clone()))
            }
            Storage::Host(_) | Storage::Device(_) => {}
        }
        let data = match &mut self.storage {
            Storage::Host(data) => Arc::make_mut(data),
            Storage::Mapped(_) | Storage::Packed(_) => {
                unreachable!("copied into owned storage above")
            }
            Storage::Device(memory) => return Err(on_device("values_mut", memory.as_ref())),
        };
        let dtype = data.dtype();
        T::slice_mut(data).ok_or(TensorError::DType {
            op: "values_mut",
            dtype,
        })
    }

    /// Copies the elements out as `T`, converting from whatever dtype is held. A device tensor
    /// is read back first; a failing device read is a panic here (use [`Tensor::to_host`] to
    /// handle it).
    pub fn to_vec<T: Element>(&self) -> Vec<T> {
        if !self.is_host() {
            return self
                .to_host()
                .unwrap_or_else(|e| panic!("reading a device tensor back: {e}"))
                .to_vec();
        }
        match self.values::<T>() {
            Ok(v) => v.to_vec(),
            Err(_) => self.to_dtype(T::DTYPE).into_vec(),
        }
    }

    fn into_vec<T: Element>(self) -> Vec<T> {
        let Storage::Host(data) = self.storage else {
            return self.to_vec();
        };
        match T::slice(&data) {
            Some(_) => match (Arc::unwrap_or_clone(data), T::DTYPE) {
                (Data::F32(v), DType::F32) => bytemuck::cast_vec(v),
                (Data::F64(v), DType::F64) => bytemuck::cast_vec(v),
                (Data::F16(v), DType::F16) => bytemuck::cast_vec(v),
                (Data::BF16(v), DType::BF16) => bytemuck::cast_vec(v),
                (Data::I32(v), DType::I32) => bytemuck::cast_vec(v),
                (Data::I64(v), DType::I64) => bytemuck::cast_vec(v),
                _ => unreachable!("slice() matched the variant"),
            },
            None => Tensor {
                shape: self.shape,
                storage: Storage::Host(data),
            }
            .to_vec(),
        }
    }

    /// Converts element type; half types widen exactly, narrowing rounds to nearest. The result
    /// is on the host (a device tensor is read back first, as in [`Tensor::to_vec`]).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let host;
        let src = if self.is_host() {
            self
        } else {
            host = self
                .to_host()
                .unwrap_or_else(|e| panic!("reading a device tensor back: {e}"));
            &host
        };
        fn convert<S: Element, D: Element>(src: &Tensor) -> Vec<D> {
            let values = src.values::<S>().expect("the dtype held");
            values.iter().map(|&x| D::from_f64(x.to_f64())).collect()
        }
        fn to<D: Element>(src: &Tensor) -> Data {
            D::into_data(match src.dtype() {
                DType::F32 => convert::<f32, D>(src),
                DType::F64 => convert::<f64, D>(src),
                DType::F16 => convert::<f16, D>(src),
                DType::BF16 => convert::<bf16, D>(src),
                DType::I32 => convert::<i32, D>(src),
                DType::I64 => convert::<i64, D>(src),
            })
        }
        let data = match dtype {
            DType::F32 => to::<f32>(src),
            DType::F64 => to::<f64>(src),
            DType::F16 => to::<f16>(src),
            DType::BF16 => to::<bf16>(src),
            DType::I32 => to::<i32>(src),
            DType::I64 => to::<i64>(src),
        };
        Tensor {
            shape: self.shape.clone(),
            storage: Storage::Host(Arc::new(data)),
        }
    }

    /// A copy of the slices `range` along the first dimension (on the tensor's device).
    pub fn rows(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        fn copy<T: Element>(
            t: &Tensor,
            elements: std::ops::Range<usize>,
            shape: &[usize],
        ) -> Result<Tensor> {
            Tensor::from_vec(shape, t.values::<T>()?[elements].to_vec())
        }
        let Some((&rows, inner)) = self.shape.split_first() else {
            return Err(TensorError::shape("rows", "a scalar has no rows"));
        };
        if range.start > range.end || range.end > rows {
            return Err(TensorError::shape(
                "rows",
                format!("rows {range:?} of a tensor of {rows}"),
            ));
        }
        let row_len: usize = inner.iter().product();
        let elements = range.start * row_len..range.end * row_len;
        if let Some(memory) = self.device_memory() {
            return memory.backend().rows(self, range);
        }
        let mut shape = self.shape.clone();
        shape[0] = range.len();
        match self.dtype() {
            DType::F32 => copy::<f32>(self, elements, &shape),
            DType::F64 => copy::<f64>(self, elements, &shape),
            DType::F16 => copy::<f16>(self, elements, &shape),
            DType::BF16 => copy::<bf16>(self, elements, &shape),
            DType::I32 => copy::<i32>(self, elements, &shape),
            DType::I64 => copy::<i64>(self, elements, &shape),
        }
    }

    /// Joins tensors along their first dimension; all must share the dtype and the other
    /// dimensions, and (joined on it) the first one's device.
    pub fn concat(parts: &[Tensor]) -> Result<Tensor> {
        fn join<T: Element>(parts: &[Tensor], shape: &[usize]) -> Result<Tensor> {
            let mut values = Vec::with_capacity(shape.iter().product());
            for part in parts {
                values.extend_from_slice(part.values::<T>()?);
            }
            Tensor::from_vec(shape, values)
        }
        let first = parts
            .first()
            .ok_or_else(|| TensorError::shape("concat", "no tensors to join"))?;
        if first.rank() == 0 {
            return Err(TensorError::shape("concat", "cannot join scalars"));
        }
        for part in parts {
            if part.dtype() != first.dtype() || part.shape.get(1..) != first.shape.get(1..) {
                return Err(TensorError::shape(
                    "concat",
                    format!(
                        "{:?} {:?} cannot follow {:?} {:?}",
                        part.dtype(),
                        part.shape,
                        first.dtype(),
                        first.shape
                    ),
                ));
            }
        }
        let mut shape = first.shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        if let Some(memory) = first.device_memory() {
            return memory
                .backend()
                .concat(&parts.iter().collect::<Vec<_>>(), &shape);
        }
        match first.dtype() {
            DType::F32 => join::<f32>(parts, &shape),
            DType::F64 => join::<f64>(parts, &shape),
            DType::F16 => join::<f16>(parts, &shape),
            DType::BF16 => join::<bf16>(parts, &shape),
            DType::I32 => join::<i32>(parts, &shape),
            DType::I64 => join::<i64>(parts, &shape),
        }
    }

    /// Same storage, new shape of the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        if numel != self.numel() {
            return Err(TensorError::shape(
                "reshape",
                format!(
                    "cannot view {:?} ({} elements) as {shape:?}",
                    self.shape,
                    self.numel()
                ),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.storage {
            Storage::Host(_) => write!(f, "Tensor({:?}, {:?})", self.shape, self.dtype()),
            Storage::Mapped(_) => write!(f, "Tensor({:?}, {:?}, mapped)", self.shape, self.dtype()),
            Storage::Packed(_) => write!(f, "Tensor({:?}, {:?}, packed)", self.shape, self.dtype()),
            Storage::Device(m) => write!(
                f,
                "Tensor({:?}, {:?}, on {})",
                self.shape,
                self.dtype(),
                m.backend().name()
            ),
        }
    }
}
