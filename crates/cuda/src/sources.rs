//! The kernel sources, embedded at build time so a binary can compile them on any machine.

/// One `kernels/*.cu` file and the `extern "C" __global__` entry points build.rs found in it.
#[derive(Debug)]
pub struct KernelFile {
    pub file: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

/// A shared `kernels/*.cuh` header, by the name the sources include it as.
#[derive(Debug)]
pub struct KernelHeader {
    pub name: &'static str,
    pub source: &'static str,
}

static KERNEL_FILES: &[KernelFile] = include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
static KERNEL_HEADERS: &[KernelHeader] = include!(concat!(env!("OUT_DIR"), "/kernel_headers.rs"));

pub fn kernel_headers() -> &'static [KernelHeader] {
    KERNEL_HEADERS
}

pub fn kernel_files() -> &'static [KernelFile] {
    KERNEL_FILES
}

/// The file defining `kernel`.
pub(crate) fn file_of(kernel: &str) -> Option<&'static KernelFile> {
    KERNEL_FILES.iter().find(|f| f.kernels.contains(&kernel))
}
