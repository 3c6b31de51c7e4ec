//! The kernel sources, embedded at build time so a binary can compile them on any machine.

/// One `kernels/*.cu` file and the `extern "C" __global__` entry points build.rs found in it.
#[derive(Debug)]
pub struct KernelFile {
    pub file: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

static KERNEL_FILES: &[KernelFile] = include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

pub fn kernel_files() -> &'static [KernelFile] {
    KERNEL_FILES
}

/// The file defining `kernel`.
pub(crate) fn file_of(kernel: &str) -> Option<&'static KernelFile> {
    KERNEL_FILES.iter().find(|f| f.kernels.contains(&kernel))
}
