//! Process-wide allocator tuning for tensor workloads.
//!
//! glibc serves every allocation above its mmap threshold (128 KiB at first) with a fresh
//! `mmap` and returns it with `munmap` on free. A training step allocates and frees hundreds of
//! such buffers (activations, gradients, packing panels), so each one paid page faults, kernel
//! zeroing of every page, and on `munmap` a TLB shootdown interrupting the other cores: measured
//! on the 4-layer MiniLM train step, a third of the process's CPU time was in the kernel.
//! Raising the threshold and the trim threshold keeps freed buffers in the heap for the next
//! step of the same shape.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// A global allocator for tensor workloads, for binaries that opt in with `#[global_allocator]`
/// (the `scalpel` binary does). It forwards to the system allocator, with two changes:
///
/// - Every allocation of at least [`ALIGNED_FROM_BYTES`] starts on a cache line. glibc aligns
///   to 16 bytes, so a tensor buffer's 64-byte vector rows straddled two cache lines: every
///   GEMM tile store wrote two lines, each fetched for ownership first. Measured on the AMX
///   kernel at 4096×1536×384 (one thread, medians of alternating rounds): an output at 16 mod
///   64 ran at 263 GFLOP/s, a line-aligned one at 312–326.
/// - Up to [`KEPT_LARGE_BLOCKS`] freed blocks of at least [`LARGE_FROM_BYTES`] are kept and
///   handed to the next allocation of the same layout. glibc serves such blocks with `mmap`
///   whatever [`keep_freed_buffers`] asks, and unmaps them on free, so every step of training
///   paid a page fault per 4 KiB of the word embedding's 47 MB gradient: 11k faults, about
///   30 ms of a 0.8 s bf16 step of the 4-layer MiniLM on a 2-core VM. A kept block given to a
///   zeroed allocation is cleared with `memset`, a few milliseconds.
pub struct TensorHeap;

/// Allocations from this size up are cache-line aligned by [`TensorHeap`]; smaller ones
/// (strings, shapes, small vectors) keep the system allocator's alignment.
pub const ALIGNED_FROM_BYTES: usize = 4096;
const CACHE_LINE: usize = 64;

/// Blocks from this size up are kept by [`TensorHeap`] when freed: glibc's ceiling for its
/// mmap threshold on 64-bit targets, so smaller blocks are glibc's to keep.
pub const LARGE_FROM_BYTES: usize = 32 << 20;
/// How many freed large blocks [`TensorHeap`] keeps at most (a training step frees one, the
/// word embedding's gradient; the bound caps the memory held for shapes never seen again).
pub const KEPT_LARGE_BLOCKS: usize = 4;

/// A freed large block: its address and the (widened) layout it was allocated with.
#[derive(Clone, Copy)]
struct KeptBlock {
    ptr: usize,
    size: usize,
    align: usize,
}

static KEPT: Mutex<[Option<KeptBlock>; KEPT_LARGE_BLOCKS]> = Mutex::new([None; KEPT_LARGE_BLOCKS]);

/// The kept blocks (nothing in the allocator panics while holding the lock, but a poisoned lock
/// still guards a consistent array).
fn kept() -> std::sync::MutexGuard<'static, [Option<KeptBlock>; KEPT_LARGE_BLOCKS]> {
    KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A kept block of exactly `layout`, taken out of the cache.
fn take_kept(layout: Layout) -> Option<*mut u8> {
    if layout.size() < LARGE_FROM_BYTES {
        return None;
    }
    let mut kept = kept();
    let slot = kept
        .iter_mut()
        .find(|b| b.is_some_and(|b| b.size == layout.size() && b.align == layout.align()))?;
    slot.take().map(|b| b.ptr as *mut u8)
}

/// Keeps a freed block of `layout` if it is large and a slot is free; false if the caller must
/// free it.
fn keep(ptr: *mut u8, layout: Layout) -> bool {
    if layout.size() < LARGE_FROM_BYTES {
        return false;
    }
    let mut kept = kept();
    let Some(slot) = kept.iter_mut().find(|b| b.is_none()) else {
        return false;
    };
    *slot = Some(KeptBlock {
        ptr: ptr as usize,
        size: layout.size(),
        align: layout.align(),
    });
    true
}

impl TensorHeap {
    fn widened(layout: Layout) -> Layout {
        if layout.size() >= ALIGNED_FROM_BYTES && layout.align() < CACHE_LINE {
            // A power of two no smaller than the old alignment, and the size is unchanged:
            // always a valid layout.
            Layout::from_size_align(layout.size(), CACHE_LINE).expect("a valid layout")
        } else {
            layout
        }
    }
}

// SAFETY: every call forwards to `System` with the widened layout, and a block is freed (or
// resized) with the same widened layout it was allocated with: `widened` depends only on the
// layout the caller passes, which the `GlobalAlloc` contract makes the allocation's own.
// A kept block was allocated by `System` with the widened layout it is handed out for, so
// every block this allocator returns is one `System` allocated with that layout.
unsafe impl GlobalAlloc for TensorHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let layout = Self::widened(layout);
        match take_kept(layout) {
            Some(ptr) => ptr,
            // SAFETY: forwarded; the widened layout has the same (non-zero) size.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let layout = Self::widened(layout);
        match take_kept(layout) {
            // SAFETY: the kept block holds `layout.size()` bytes and is ours alone.
            Some(ptr) => unsafe {
                std::ptr::write_bytes(ptr, 0, layout.size());
                ptr
            },
            // SAFETY: as `alloc`.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let layout = Self::widened(layout);
        if !keep(ptr, layout) {
            // SAFETY: `ptr` came from `System` with this widened layout (see above).
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = Self::widened(layout);
        // SAFETY: the caller guarantees `new_size`, rounded to the alignment, fits in isize.
        let new =
            Self::widened(unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) });
        if old.align() == new.align() {
            // SAFETY: `ptr` was allocated by `System` with `old`.
            return unsafe { System.realloc(ptr, old, new_size) };
        }
        // Crossing the threshold changes the alignment, which `realloc` cannot: move the block.
        // SAFETY: `new` has a non-zero size; the copy stays inside both blocks; `ptr` is freed
        // with the layout it was allocated with.
        unsafe {
            let moved = System.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                System.dealloc(ptr, old);
            }
            moved
        }
    }
}

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
