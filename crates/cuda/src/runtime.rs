//! One host code path for both devices: allocation, copies, argument marshalling and launches
//! by kernel name go through [`Runtime`]; only the [`RawDevice`] below it differs.
//!
//! The runtime keeps freed buffers in free lists keyed by size class (as PyTorch's and tinygrad's
//! caching allocators do), so a training step that repeats the previous one's shapes asks the
//! driver for nothing, and it counts the traffic and allocations that `--device-stats` reports.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use half::{bf16, f16};
use scalpel_tensor::DeviceStats;

use crate::{CudaError, Result};

/// What a device must provide. Addresses are `u64` device pointers (`CUdeviceptr`); the
/// emulator's are host addresses.
pub(crate) trait RawDevice: Send + Sync {
    fn name(&self) -> String;
    /// Device memory is host memory and kernels run on the CPU.
    fn is_emulator(&self) -> bool {
        false
    }
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// # Safety
    /// `ptr` came from `alloc` on this backend and is not used afterwards.
    unsafe fn free(&self, ptr: u64);
    /// Copies `src` to `dst`, ordered before every later launch and copy; it may return before
    /// the copy has landed (`src` may be reused at once).
    ///
    /// # Safety
    /// `dst..dst+src.len()` lies in one allocation of this backend.
    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// # Safety
    /// `src..src+dst.len()` lies in one allocation of this backend.
    unsafe fn copy_to_host(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// # Safety
    /// `dst..dst+bytes` lies in one allocation of this backend.
    unsafe fn fill_zero(&self, dst: u64, bytes: usize) -> Result<()>;
    /// Launches `kernel` with `args` laid out as for `cuLaunchKernel`: one pointer per parameter,
    /// pointing at the parameter's value. Launches run in order; copies wait for them.
    /// # Safety
    /// The arguments match the kernel's parameters and every pointer in them is valid for it.
    unsafe fn launch(
        &self,
        kernel: &str,
        config: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()>;
    /// Milliseconds the device spent on the launches `work` made: CUDA events around them on a
    /// GPU, the host clock on the emulator (whose launches are synchronous).
    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64>;
    /// Makes the device current on the calling thread (for libraries such as cuBLAS that use
    /// the current context).
    fn make_current(&self) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A one-dimensional launch of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchConfig {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared_bytes: 0,
        }
    }
}

/// A kernel parameter by value. Device buffers pass their address.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
}

impl KernelArg {
    /// The parameter's bytes in an 8-byte slot (the value first: the host is little-endian).
    fn slot(self) -> u64 {
        match self {
            KernelArg::Ptr(p) => p,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::U32(v) => v as u64,
            KernelArg::F32(v) => v.to_bits() as u64,
        }
    }
}

/// A `const T*` kernel parameter: the address of a buffer (or of an element in it) that the
/// kernel only reads, borrowed from the buffer for as long as the argument lives.
#[derive(Clone, Copy)]
pub struct DeviceIn<'a, T: DeviceElement> {
    addr: u64,
    _buffer: PhantomData<&'a DeviceBuffer<T>>,
}

/// A `T*` kernel parameter: a buffer the kernel may write, borrowed mutably (so no other
/// argument of the launch can alias it, as the kernels' `__restrict__` promises).
pub struct DeviceOut<'a, T: DeviceElement> {
    addr: u64,
    _buffer: PhantomData<&'a mut DeviceBuffer<T>>,
}

impl<T: DeviceElement> DeviceIn<'_, T> {
    /// A null `const T*`, for kernels that take one to mean "none" (the GEMM's bias).
    pub(crate) fn null() -> DeviceIn<'static, T> {
        DeviceIn {
            addr: 0,
            _buffer: PhantomData,
        }
    }

    pub(crate) fn arg(self) -> KernelArg {
        KernelArg::Ptr(self.addr)
    }
}

impl<T: DeviceElement> DeviceOut<'_, T> {
    /// A null `T*`, for kernels that take one to mean "not wanted" (the GEMM's pre-activation).
    pub(crate) fn null() -> DeviceOut<'static, T> {
        DeviceOut {
            addr: 0,
            _buffer: PhantomData,
        }
    }

    pub(crate) fn arg(self) -> KernelArg {
        KernelArg::Ptr(self.addr)
    }
}

/// Element types device buffers may hold.
pub trait DeviceElement: bytemuck::Pod + Send + Sync + 'static {}
impl DeviceElement for f32 {}
impl DeviceElement for i32 {}
impl DeviceElement for u32 {}
impl DeviceElement for u64 {}
impl DeviceElement for f16 {}
impl DeviceElement for bf16 {}

/// The allocation size a request of `bytes` is served from: 512-byte granules up to 4 KiB, then
/// eight classes per power of two (at most 12.5 % unused), so that buffers of nearby sizes (a
/// batch padded to 57 tokens, then to 61) reuse each other's memory.
fn size_class(bytes: usize) -> usize {
    const GRANULE: usize = 512;
    if bytes <= 8 * GRANULE {
        return bytes.max(1).next_multiple_of(GRANULE);
    }
    let step = bytes.next_power_of_two() / 16;
    bytes.next_multiple_of(step)
}

#[derive(Default)]
struct Counters {
    h2d_bytes: AtomicU64,
    d2h_bytes: AtomicU64,
    driver_allocs: AtomicU64,
    driver_frees: AtomicU64,
    launches: AtomicU64,
    /// Bytes held from the driver now, and the most ever.
    held_bytes: AtomicU64,
    peak_bytes: AtomicU64,
}

struct Inner {
    device: Box<dyn RawDevice>,
    /// Freed allocations by size class, reused before the driver is asked.
    free: Mutex<BTreeMap<usize, Vec<u64>>>,
    counters: Counters,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let free = std::mem::take(self.free.get_mut().unwrap_or_else(|e| e.into_inner()));
        for ptr in free.into_values().flatten() {
            // SAFETY: allocated by this device, no buffer refers to it any more.
            unsafe { self.device.free(ptr) };
        }
    }
}

/// A device (GPU or emulator) to allocate on and launch kernels on. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("device", &self.inner.device.name())
            .finish()
    }
}

impl Runtime {
    fn new(device: Box<dyn RawDevice>) -> Runtime {
        Runtime {
            inner: Arc::new(Inner {
                device,
                free: Mutex::new(BTreeMap::new()),
                counters: Counters::default(),
            }),
        }
    }

    /// The CPU emulator: runs the same kernel sources, compiled as host C++. Always available.
    pub fn emulator() -> Runtime {
        Runtime::new(Box::new(crate::emulator::Emulator::default()))
    }

    /// GPU `ordinal` through the CUDA driver, kernels compiled by NVRTC for its architecture.
    /// Fails (never panics) when there is no driver, no GPU or no NVRTC.
    pub fn cuda(ordinal: usize) -> Result<Runtime> {
        Ok(Runtime::new(Box::new(crate::driver::CudaBackend::new(
            ordinal,
        )?)))
    }

    /// Milliseconds the device spent on the launches `work` made (see [`RawDevice::time`]).
    pub fn time_ms(&self, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
        self.inner.device.time(&mut work)
    }

    pub(crate) fn make_current(&self) -> Result<()> {
        self.inner.device.make_current()
    }

    /// Traffic and allocation counters since this runtime was created.
    pub fn stats(&self) -> DeviceStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceStats {
            h2d_bytes: get(&c.h2d_bytes),
            d2h_bytes: get(&c.d2h_bytes),
            driver_allocs: get(&c.driver_allocs),
            driver_frees: get(&c.driver_frees),
            launches: get(&c.launches),
            peak_device_bytes: get(&c.peak_bytes),
        }
    }

    /// Identifies the device: clones of one runtime share it.
    pub fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as *const u8 as usize
    }

    /// `class` bytes from the free list (unless `fresh`), else from the driver.
    fn allocate(&self, class: usize, fresh: bool) -> Result<u64> {
        if !fresh {
            let cached = self
                .inner
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&class)
                .and_then(Vec::pop);
            if let Some(ptr) = cached {
                return Ok(ptr);
            }
        }
        let c = &self.inner.counters;
        let ptr = match self.inner.device.alloc(class) {
            Ok(ptr) => ptr,
            Err(_) => {
                // Out of memory with buffers cached: give them back to the driver and retry.
                self.release_cached();
                self.inner.device.alloc(class)?
            }
        };
        c.driver_allocs.fetch_add(1, Ordering::Relaxed);
        let held = c.held_bytes.fetch_add(class as u64, Ordering::Relaxed) + class as u64;
        c.peak_bytes.fetch_max(held, Ordering::Relaxed);
        Ok(ptr)
    }

    /// Frees every cached buffer (live buffers are untouched).
    pub fn release_cached(&self) {
        let free = std::mem::take(&mut *self.inner.free.lock().unwrap_or_else(|e| e.into_inner()));
        let c = &self.inner.counters;
        for (class, ptrs) in free {
            for ptr in ptrs {
                // SAFETY: allocated by this device and no longer referred to by any buffer.
                unsafe { self.inner.device.free(ptr) };
                c.driver_frees.fetch_add(1, Ordering::Relaxed);
                c.held_bytes.fetch_sub(class as u64, Ordering::Relaxed);
            }
        }
    }

    /// A buffer of `len` elements whose contents are unspecified: for outputs a kernel writes
    /// in full before anything reads them.
    pub fn uninit<T: DeviceElement>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.new_buffer(len, false)
    }

    /// [`Runtime::uninit`] for a long-lived tensor (a model's weights, optimiser moments): taken
    /// from the driver, not from blocks a step freed, which the next step would then miss (the
    /// AdamW moments made during a heal's first step had cost its second two fresh allocations).
    pub fn uninit_long_lived<T: DeviceElement>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.new_buffer(len, true)
    }

    fn new_buffer<T: DeviceElement>(&self, len: usize, fresh: bool) -> Result<DeviceBuffer<T>> {
        let class = size_class(len * std::mem::size_of::<T>());
        Ok(DeviceBuffer {
            runtime: self.clone(),
            ptr: self.allocate(class, fresh)?,
            len,
            class,
            _element: PhantomData,
        })
    }

    /// GPU 0 when [`Runtime::cuda`] succeeds, else the emulator.
    pub fn best_available() -> Runtime {
        Runtime::cuda(0).unwrap_or_else(|_| Runtime::emulator())
    }

    pub fn name(&self) -> String {
        self.inner.device.name()
    }

    /// The CPU emulator rather than a GPU.
    pub fn is_emulator(&self) -> bool {
        self.inner.device.is_emulator()
    }

    pub fn zeros<T: DeviceElement>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.zeroed(self.uninit::<T>(len)?)
    }

    /// [`Runtime::zeros`] in a long-lived buffer ([`Runtime::uninit_long_lived`]).
    pub fn zeros_long_lived<T: DeviceElement>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.zeroed(self.uninit_long_lived::<T>(len)?)
    }

    fn zeroed<T: DeviceElement>(&self, buffer: DeviceBuffer<T>) -> Result<DeviceBuffer<T>> {
        let len = buffer.len;
        // SAFETY: within the buffer's allocation.
        unsafe {
            self.inner
                .device
                .fill_zero(buffer.ptr, len * std::mem::size_of::<T>())?
        };
        Ok(buffer)
    }

    pub fn upload<T: DeviceElement>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buffer = self.uninit(host.len())?;
        buffer.copy_from_host(host)?;
        Ok(buffer)
    }

    /// Launches `kernel` by name, marshalling `args` into a `cuLaunchKernel` argument array.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and type, and the kernel
    /// must stay inside the buffers it is given for the launch configuration: neither can be
    /// checked here. The generated launchers and the operations of [`crate::kernels`] uphold this.
    pub unsafe fn launch(
        &self,
        kernel: &str,
        config: LaunchConfig,
        args: &[KernelArg],
    ) -> Result<()> {
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut pointers: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        self.inner.counters.launches.fetch_add(1, Ordering::Relaxed);
        self.inner.device.launch(kernel, config, &mut pointers)
    }

    pub(crate) fn same_as(&self, other: &Runtime) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// A typed allocation on a [`Runtime`]'s device, returned to the runtime's free lists on drop.
pub struct DeviceBuffer<T: DeviceElement> {
    runtime: Runtime,
    ptr: u64,
    len: usize,
    /// The allocation's size class (its free list).
    class: usize,
    _element: PhantomData<T>,
}

impl<T: DeviceElement> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address, for a table in device memory that a kernel reads pointers from.
    pub(crate) fn address(&self) -> u64 {
        self.ptr
    }

    /// The device address, as a kernel argument.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.ptr)
    }

    /// The buffer as a `const T*` kernel argument.
    pub fn input(&self) -> DeviceIn<'_, T> {
        DeviceIn {
            addr: self.ptr,
            _buffer: PhantomData,
        }
    }

    /// The buffer from element `offset` on, as a `const T*` kernel argument.
    pub fn input_at(&self, offset: usize) -> Result<DeviceIn<'_, T>> {
        Ok(DeviceIn {
            addr: self.addr_at(offset)?,
            _buffer: PhantomData,
        })
    }

    /// The buffer as a `T*` kernel argument.
    pub fn output(&mut self) -> DeviceOut<'_, T> {
        DeviceOut {
            addr: self.ptr,
            _buffer: PhantomData,
        }
    }

    /// The buffer from element `offset` on, as a `T*` kernel argument.
    pub fn output_at(&mut self, offset: usize) -> Result<DeviceOut<'_, T>> {
        Ok(DeviceOut {
            addr: self.addr_at(offset)?,
            _buffer: PhantomData,
        })
    }

    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        if host.len() != self.len {
            return Err(CudaError::Shape(format!(
                "copying {} elements into a buffer of {}",
                host.len(),
                self.len
            )));
        }
        let bytes: &[u8] = bytemuck::cast_slice(host);
        self.runtime
            .inner
            .counters
            .h2d_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        // SAFETY: exactly this allocation.
        unsafe { self.runtime.inner.device.copy_to_device(self.ptr, bytes) }
    }

    pub fn to_host(&self) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); self.len];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut host);
        self.runtime
            .inner
            .counters
            .d2h_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        // SAFETY: exactly this allocation.
        unsafe { self.runtime.inner.device.copy_to_host(self.ptr, bytes)? };
        Ok(host)
    }

    /// The device address (for libraries that take raw pointers: the cuBLAS reference).
    pub(crate) fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The runtime this buffer lives on.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    fn addr_at(&self, offset: usize) -> Result<u64> {
        if offset > self.len {
            return Err(CudaError::Shape(format!(
                "offset {offset} past a buffer of {}",
                self.len
            )));
        }
        Ok(self.ptr + (offset * std::mem::size_of::<T>()) as u64)
    }

    pub(crate) fn check_runtime(&self, runtime: &Runtime) -> Result<()> {
        if self.runtime.same_as(runtime) {
            Ok(())
        } else {
            Err(CudaError::Shape("a buffer from another runtime".into()))
        }
    }
}

impl<T: DeviceElement> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        self.runtime
            .inner
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(self.class)
            .or_default()
            .push(self.ptr);
    }
}
