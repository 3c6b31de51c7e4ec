//! One host code path for both backends: allocation, copies, argument marshalling and launches
//! by kernel name go through [`Runtime`]; only the [`Backend`] below it differs.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use half::{bf16, f16};

use crate::{CudaError, Result};

/// What a device must provide. Addresses are `u64` device pointers (`CUdeviceptr`); the
/// emulator's are host addresses.
pub(crate) trait Backend: Send + Sync {
    fn name(&self) -> String;
    /// Device memory is host memory and kernels run on the CPU.
    fn is_emulator(&self) -> bool {
        false
    }
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// # Safety
    /// `ptr` came from `alloc` on this backend and is not used afterwards.
    unsafe fn free(&self, ptr: u64);
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
    F32(f32),
}

impl KernelArg {
    /// The parameter's bytes in an 8-byte slot (the value first: the host is little-endian).
    fn slot(self) -> u64 {
        match self {
            KernelArg::Ptr(p) => p,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::F32(v) => v.to_bits() as u64,
        }
    }
}

/// Element types device buffers may hold.
pub trait DeviceElement: bytemuck::Pod + Send + Sync + 'static {}
impl DeviceElement for f32 {}
impl DeviceElement for i32 {}
impl DeviceElement for u32 {}
impl DeviceElement for f16 {}
impl DeviceElement for bf16 {}

/// A device (GPU or emulator) to allocate on and launch kernels on. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Runtime {
    /// The CPU emulator: runs the same kernel sources, compiled as host C++. Always available.
    pub fn emulator() -> Runtime {
        Runtime {
            backend: Arc::new(crate::emulator::Emulator::default()),
        }
    }

    /// GPU `ordinal` through the CUDA driver, kernels compiled by NVRTC for its architecture.
    /// Fails (never panics) when there is no driver, no GPU or no NVRTC.
    pub fn cuda(ordinal: usize) -> Result<Runtime> {
        Ok(Runtime {
            backend: Arc::new(crate::driver::CudaBackend::new(ordinal)?),
        })
    }

    /// GPU 0 when [`Runtime::cuda`] succeeds, else the emulator.
    pub fn best_available() -> Runtime {
        Runtime::cuda(0).unwrap_or_else(|_| Runtime::emulator())
    }

    pub fn name(&self) -> String {
        self.backend.name()
    }

    /// The CPU emulator rather than a GPU.
    pub fn is_emulator(&self) -> bool {
        self.backend.is_emulator()
    }

    pub fn zeros<T: DeviceElement>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes = len * std::mem::size_of::<T>();
        let ptr = self.backend.alloc(bytes)?;
        let buffer = DeviceBuffer {
            runtime: self.clone(),
            ptr,
            len,
            _element: PhantomData,
        };
        // SAFETY: the whole fresh allocation.
        unsafe { self.backend.fill_zero(ptr, bytes)? };
        Ok(buffer)
    }

    pub fn upload<T: DeviceElement>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buffer = self.zeros(host.len())?;
        buffer.copy_from_host(host)?;
        Ok(buffer)
    }

    /// Launches `kernel` by name, marshalling `args` into a `cuLaunchKernel` argument array.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and type, and the kernel
    /// must stay inside the buffers it is given for the launch configuration: neither can be
    /// checked here. The typed functions in [`crate::ops`] uphold this.
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
        self.backend.launch(kernel, config, &mut pointers)
    }

    fn same_as(&self, other: &Runtime) -> bool {
        Arc::ptr_eq(&self.backend, &other.backend)
    }
}

/// A typed allocation on a [`Runtime`]'s device, freed on drop.
pub struct DeviceBuffer<T: DeviceElement> {
    runtime: Runtime,
    ptr: u64,
    len: usize,
    _element: PhantomData<T>,
}

impl<T: DeviceElement> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address, as a kernel argument.
    pub fn arg(&self) -> KernelArg {
        KernelArg::Ptr(self.ptr)
    }

    pub fn copy_from_host(&mut self, host: &[T]) -> Result<()> {
        if host.len() != self.len {
            return Err(CudaError::Shape(format!(
                "copying {} elements into a buffer of {}",
                host.len(),
                self.len
            )));
        }
        // SAFETY: exactly this allocation.
        unsafe {
            self.runtime
                .backend
                .copy_to_device(self.ptr, bytemuck::cast_slice(host))
        }
    }

    pub fn to_host(&self) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); self.len];
        // SAFETY: exactly this allocation.
        unsafe {
            self.runtime
                .backend
                .copy_to_host(self.ptr, bytemuck::cast_slice_mut(&mut host))?
        };
        Ok(host)
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
        // SAFETY: allocated by this backend, dropped once.
        unsafe { self.runtime.backend.free(self.ptr) }
    }
}
