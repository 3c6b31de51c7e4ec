//! Process-wide allocator tuning for tensor workloads.
//!
//! glibc serves every allocation above its mmap threshold (128 KiB at first) with a fresh
//! `mmap` and returns it with `munmap` on free. A training step allocates and frees hundreds of
//! such buffers (activations, gradients, packing panels), so each one paid page faults, kernel
//! zeroing of every page, and on `munmap` a TLB shootdown interrupting the other cores: measured
//! on the 4-layer MiniLM train step, a third of the process's CPU time was in the kernel.
//! Raising the threshold and the trim threshold keeps freed buffers in the heap for the next
//! step of the same shape.

/// Keep freed tensor buffers in the process heap for reuse instead of returning them to the
/// kernel. Call once at start-up, before the first large allocation; the `scalpel` binary does.
/// Returns whether the allocator accepted the settings (false on non-glibc targets, where this
/// does nothing).
pub fn keep_freed_buffers() -> bool {
    imp::keep_freed_buffers()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use std::ffi::c_int;

    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    /// glibc's ceiling for the mmap threshold on 64-bit targets; larger buffers (the embedding
    /// table's gradient) still come from `mmap`.
    const MMAP_THRESHOLD_MAX: c_int = 32 << 20;
    const TRIM_THRESHOLD: c_int = 1 << 30;

    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    pub fn keep_freed_buffers() -> bool {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
                && mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn keep_freed_buffers() -> bool {
        false
    }
}
