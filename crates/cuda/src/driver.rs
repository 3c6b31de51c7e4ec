//! The GPU backend: the CUDA driver API through cudarc, kernels compiled by NVRTC for the
//! device's architecture (through the PTX cache) and loaded one module per `.cu` file on first use.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};

use cudarc::driver::{result, sys, CudaContext};

use crate::nvrtc::{CompileOptions, PtxCache};
use crate::runtime::{LaunchConfig, RawDevice};
use crate::sources::file_of;
use crate::{CudaError, Result};

/// A loaded kernel. Driver handles are plain pointers, valid in every thread bound to the context.
#[derive(Clone, Copy)]
struct Function(sys::CUfunction);
// SAFETY: CUfunction handles may be used from any thread with the owning context current.
unsafe impl Send for Function {}

pub(crate) struct CudaBackend {
    context: Arc<CudaContext>,
    arch: u32,
    name: String,
    functions: Mutex<HashMap<String, Function>>,
    staging: Mutex<Option<Staging>>,
}

/// Uploads up to this size (a batch's ids and mask, an optimiser step's tables) go through the
/// pinned staging buffer; larger ones (weights, moved once) are copied synchronously from where
/// they are rather than held twice.
const STAGED_UPLOAD_MAX: usize = 16 << 20;

/// Page-locked host memory that small uploads are staged through: the copy engine reads it
/// directly (no bounce through the driver's own buffer) and the copy is asynchronous on the
/// stream the kernels use, so the host goes on to the next launch while it runs. The next staged
/// upload waits on `copied` before overwriting the buffer.
struct Staging {
    ptr: *mut u8,
    capacity: usize,
    copied: sys::CUevent,
}
// SAFETY: the pointer is page-locked memory owned by this struct, used under the backend's mutex.
unsafe impl Send for Staging {}

impl Staging {
    /// # Safety
    /// The context must be current.
    unsafe fn new(capacity: usize) -> Result<Staging> {
        let ptr = result::malloc_host(capacity, 0)? as *mut u8;
        match result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING) {
            Ok(copied) => Ok(Staging {
                ptr,
                capacity,
                copied,
            }),
            Err(e) => {
                let _ = result::free_host(ptr as *mut c_void);
                Err(e.into())
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`; a pending copy completes before the memory is released
        // (cuMemFreeHost synchronises).
        unsafe {
            let _ = result::event::destroy(self.copied);
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}

impl CudaBackend {
    pub(crate) fn new(ordinal: usize) -> Result<Self> {
        // Without libcuda, CudaContext::new panics: probe for the library first.
        // SAFETY: only probes for the library.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "CUDA driver library (libcuda.so) not found".into(),
            ));
        }
        let context = std::panic::catch_unwind(|| CudaContext::new(ordinal)).map_err(|_| {
            CudaError::Unavailable("the CUDA driver panicked while creating a context".into())
        })??;
        let (major, minor) = context.compute_capability()?;
        let arch = (major * 10 + minor) as u32;
        let name = format!("{} (sm_{arch})", context.name()?);
        crate::nvrtc::version()?;
        Ok(CudaBackend {
            context,
            arch,
            name,
            functions: Mutex::new(HashMap::new()),
            staging: Mutex::new(None),
        })
    }

    fn function(&self, kernel: &str) -> Result<Function> {
        let mut functions = self.functions.lock().unwrap();
        if let Some(f) = functions.get(kernel) {
            return Ok(*f);
        }
        let file = file_of(kernel).ok_or_else(|| CudaError::UnknownKernel(kernel.into()))?;
        let ptx =
            CString::new(PtxCache::default_location().ptx(file, CompileOptions::new(self.arch))?)
                .map_err(|_| CudaError::Nvrtc("PTX with a NUL byte".into()))?;
        // SAFETY: the context is current; the image is NUL-terminated PTX. Modules stay loaded
        // for the context's lifetime.
        let module = unsafe { result::module::load_data(ptx.as_ptr() as *const c_void)? };
        for &name in file.kernels {
            // SAFETY: a loaded module and one of its entry points.
            let f = unsafe { result::module::get_function(module, CString::new(name).unwrap())? };
            functions.insert(name.to_string(), Function(f));
        }
        functions
            .get(kernel)
            .copied()
            .ok_or_else(|| CudaError::UnknownKernel(kernel.into()))
    }
}

impl RawDevice for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.context.bind_to_thread()?;
        // SAFETY: the context is current.
        Ok(unsafe { result::malloc_sync(bytes.max(1))? })
    }

    unsafe fn free(&self, ptr: u64) {
        // Freeing can only fail when the context is already broken; nothing to do then.
        if self.context.bind_to_thread().is_ok() {
            let _ = result::free_sync(ptr);
        }
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.context.bind_to_thread()?;
        if src.is_empty() {
            return Ok(());
        }
        if src.len() > STAGED_UPLOAD_MAX {
            return Ok(result::memcpy_htod_sync(dst, src)?);
        }
        let mut staging = self.staging.lock().unwrap();
        match &*staging {
            Some(s) if s.capacity >= src.len() => result::event::synchronize(s.copied)?,
            _ => {
                // Dropping the old buffer waits for its copy.
                *staging = None;
                *staging = Some(Staging::new(src.len().next_power_of_two().max(64 << 10))?);
            }
        }
        let s = staging.as_ref().expect("set above");
        std::ptr::copy_nonoverlapping(src.as_ptr(), s.ptr, src.len());
        let staged = std::slice::from_raw_parts(s.ptr, src.len());
        // The legacy default stream, as the launches: kernels after this upload see its data.
        result::memcpy_htod_async(dst, staged, std::ptr::null_mut())?;
        Ok(result::event::record(s.copied, std::ptr::null_mut())?)
    }

    unsafe fn copy_to_host(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.context.bind_to_thread()?;
        Ok(result::memcpy_dtoh_sync(dst, src)?)
    }

    unsafe fn fill_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.context.bind_to_thread()?;
        Ok(result::memset_d8_sync(dst, 0, bytes)?)
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        config: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        self.context.bind_to_thread()?;
        let f = self.function(kernel)?;
        let [gx, gy, gz] = config.grid;
        let [bx, by, bz] = config.block;
        // The legacy default stream: launches run in order and the synchronous copies wait for
        // them, so a kernel's fault surfaces at the latest at the next copy back.
        Ok(result::launch_kernel(
            f.0,
            (gx, gy, gz),
            (bx, by, bz),
            config.shared_bytes,
            std::ptr::null_mut(),
            args,
        )?)
    }

    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.context.bind_to_thread()?;
        let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
        let (start, end) = (result::event::create(flags)?, result::event::create(flags)?);
        let timed = (|| -> Result<f64> {
            // SAFETY: fresh events, recorded on the legacy default stream the launches use.
            unsafe { result::event::record(start, std::ptr::null_mut())? };
            work()?;
            unsafe {
                result::event::record(end, std::ptr::null_mut())?;
                result::event::synchronize(end)?;
                Ok(result::event::elapsed(start, end)? as f64)
            }
        })();
        // SAFETY: created above, no longer used.
        unsafe {
            let _ = result::event::destroy(start);
            let _ = result::event::destroy(end);
        }
        timed
    }

    fn make_current(&self) -> Result<()> {
        Ok(self.context.bind_to_thread()?)
    }
}
