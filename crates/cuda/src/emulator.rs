//! The CPU emulator backend: device memory is host memory, launches go to `emu_launch`
//! (emu/runtime.cpp), which runs the kernels compiled from the same `.cu` sources.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Mutex;

use crate::runtime::{LaunchConfig, RawDevice};
use crate::{CudaError, Result};

extern "C" {
    fn emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: usize,
        args: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// Alignment of emulated allocations, as cudaMalloc's.
const ALIGN: usize = 256;

#[derive(Default)]
pub(crate) struct Emulator {
    /// Live allocations and their layouts, to free them and to reject foreign pointers.
    allocations: Mutex<HashMap<u64, Layout>>,
}

impl RawDevice for Emulator {
    fn name(&self) -> String {
        "CPU emulator".into()
    }

    fn is_emulator(&self) -> bool {
        true
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|e| CudaError::Emulator(e.to_string()))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(CudaError::Emulator(format!(
                "out of memory allocating {bytes} bytes"
            )));
        }
        self.allocations.lock().unwrap().insert(ptr as u64, layout);
        Ok(ptr as u64)
    }

    unsafe fn free(&self, ptr: u64) {
        if let Some(layout) = self.allocations.lock().unwrap().remove(&ptr) {
            std::alloc::dealloc(ptr as *mut u8, layout);
        }
    }

    unsafe fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
        Ok(())
    }

    unsafe fn copy_to_host(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len());
        Ok(())
    }

    unsafe fn fill_zero(&self, dst: u64, bytes: usize) -> Result<()> {
        std::ptr::write_bytes(dst as *mut u8, 0, bytes);
        Ok(())
    }

    unsafe fn launch(
        &self,
        kernel: &str,
        config: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let name = CString::new(kernel).map_err(|_| CudaError::UnknownKernel(kernel.into()))?;
        let mut error = vec![0u8; 1024];
        let status = emu_launch(
            name.as_ptr(),
            config.grid.as_ptr(),
            config.block.as_ptr(),
            config.shared_bytes as usize,
            args.as_mut_ptr(),
            error.as_mut_ptr() as *mut c_char,
            error.len(),
        );
        let message = || {
            let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
            String::from_utf8_lossy(&error[..end]).into_owned()
        };
        // Status codes of emu/runtime.cpp.
        match status {
            0 => Ok(()),
            1 => Err(CudaError::UnknownKernel(kernel.into())),
            _ => Err(CudaError::Emulator(message())),
        }
    }

    fn time(&self, work: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let start = std::time::Instant::now();
        work()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }
}
