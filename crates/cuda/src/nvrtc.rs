//! Compiling `kernels/*.cu` with NVRTC, the on-disk PTX cache, and ptxas's resource report.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Serialize;

use crate::sources::{kernel_files, kernel_headers, KernelFile};
use crate::{CudaError, Result, Toolkit};

/// The architectures the compile check covers: A100 and H100.
pub const CHECKED_ARCHS: [u32; 2] = [80, 90];

/// Loads NVRTC once (by absolute path when the toolkit lookup found it, so that no
/// `LD_LIBRARY_PATH` is needed) and returns its version.
pub fn version() -> Result<(i32, i32)> {
    static VERSION: OnceLock<Result<(i32, i32), String>> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let toolkit = Toolkit::discover();
            if let Some(path) = &toolkit.nvrtc_library {
                // Kept loaded for the process: cudarc then opens it by its soname, which the
                // dynamic loader resolves to this already-loaded copy.
                // SAFETY: loading NVRTC runs no initialisation code with preconditions.
                let library = unsafe { libloading::Library::new(path) }
                    .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
                std::mem::forget(library);
            }
            // SAFETY: only probes for the library.
            if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                return Err("NVRTC library (libnvrtc.so.12) not found: run `eval \"$(scripts/cuda_wheels.sh)\"` \
                            or put a CUDA 12 toolkit's lib64 on LD_LIBRARY_PATH"
                    .to_string());
            }
            let (mut major, mut minor) = (0, 0);
            // SAFETY: two valid out-pointers.
            unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
                .result()
                .map_err(|e| format!("nvrtcVersion: {e}"))?;
            Ok((major, minor))
        })
        .clone()
        .map_err(CudaError::Unavailable)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompileOptions {
    /// Compute capability times ten: 80 for sm_80, 90 for sm_90.
    pub arch: u32,
    /// Fused multiply-add contraction. Off for bit-level comparisons with the CPU references.
    pub fmad: bool,
}

impl CompileOptions {
    pub fn new(arch: u32) -> Self {
        CompileOptions { arch, fmad: true }
    }
}

fn arch_name(arch: u32) -> &'static str {
    static NAMES: OnceLock<std::sync::Mutex<Vec<(u32, &'static str)>>> = OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock().unwrap();
    if let Some((_, n)) = names.iter().find(|(a, _)| *a == arch) {
        return n;
    }
    let name: &'static str = Box::leak(format!("sm_{arch}").into_boxed_str());
    names.push((arch, name));
    name
}

/// Compiles one kernel file to PTX (no cache).
pub fn compile(file: &KernelFile, options: CompileOptions) -> Result<String> {
    version()?;
    let toolkit = Toolkit::discover();
    let missing = toolkit.missing_headers();
    if !missing.is_empty() {
        return Err(CudaError::Unavailable(format!(
            "CUDA headers {missing:?} not found in {:?}: run `eval \"$(scripts/cuda_wheels.sh)\"` or set SCALPEL_CUDA_INCLUDE",
            toolkit.include_dirs
        )));
    }
    let mut options = vec![
        format!("--gpu-architecture={}", arch_name(options.arch)),
        format!("--fmad={}", options.fmad),
        "--std=c++17".to_string(),
    ];
    options.extend(
        toolkit
            .include_dirs
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    compile_with_headers(file, &options)
}

/// NVRTC with the shared `kernels/*.cuh` headers supplied from memory (a binary compiles its
/// kernels on a machine that has no `kernels/` folder).
fn compile_with_headers(file: &KernelFile, options: &[String]) -> Result<String> {
    use cudarc::nvrtc::{result, sys};
    let c = |s: &str| {
        std::ffi::CString::new(s)
            .map_err(|_| CudaError::Nvrtc(format!("{}: a NUL byte", file.file)))
    };
    let headers = kernel_headers();
    let sources = headers
        .iter()
        .map(|h| c(h.source))
        .collect::<Result<Vec<_>>>()?;
    let names = headers
        .iter()
        .map(|h| c(h.name))
        .collect::<Result<Vec<_>>>()?;
    let source_ptrs: Vec<*const std::ffi::c_char> = sources.iter().map(|s| s.as_ptr()).collect();
    let name_ptrs: Vec<*const std::ffi::c_char> = names.iter().map(|s| s.as_ptr()).collect();
    let (src, name) = (c(file.source)?, c(file.file)?);
    let failed = |e: &dyn std::fmt::Debug| CudaError::Nvrtc(format!("{}: {e:?}", file.file));
    let mut program = std::mem::MaybeUninit::uninit();
    // SAFETY: every string is NUL-terminated and outlives the program; the header arrays have
    // `headers.len()` entries each.
    let program = unsafe {
        sys::nvrtcCreateProgram(
            program.as_mut_ptr(),
            src.as_ptr(),
            name.as_ptr(),
            headers.len() as i32,
            source_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
        .result()
        .map_err(|e| failed(&e))?;
        program.assume_init()
    };
    // SAFETY: a program created above, destroyed once at the end.
    let compiled = unsafe {
        match result::compile_program(program, options) {
            Ok(()) => result::get_ptx(program).map_err(|e| failed(&e)),
            Err(_) => {
                let log = result::get_program_log(program).map_err(|e| failed(&e))?;
                let log = std::ffi::CStr::from_ptr(log.as_ptr())
                    .to_string_lossy()
                    .into_owned();
                Err(CudaError::Nvrtc(format!(
                    "{} ({}):\n{log}",
                    file.file, options[0]
                )))
            }
        }
    };
    // SAFETY: created above, not used afterwards.
    let _ = unsafe { result::destroy_program(program) };
    let ptx = compiled?;
    // SAFETY: NVRTC returns NUL-terminated PTX.
    Ok(unsafe { std::ffi::CStr::from_ptr(ptx.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// FNV-1a, 64 bit: a stable hash for cache keys (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Compiled PTX on disk, keyed by source hash, architecture, NVRTC version (PTX is stamped with
/// it: an older driver cannot load newer PTX) and options.
#[derive(Clone, Debug)]
pub struct PtxCache {
    /// `None` when no location could be found: every lookup compiles.
    dir: Option<PathBuf>,
}

impl PtxCache {
    /// `SCALPEL_PTX_CACHE`, else `$XDG_CACHE_HOME/scalpel/ptx`, else `~/.cache/scalpel/ptx`.
    pub fn default_location() -> Self {
        let dir = std::env::var_os("SCALPEL_PTX_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .map(|base| base.join("scalpel/ptx"))
            });
        PtxCache { dir }
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        PtxCache {
            dir: Some(dir.into()),
        }
    }

    /// The cached PTX for `file`, compiling (and storing) it on a miss.
    pub fn ptx(&self, file: &KernelFile, options: CompileOptions) -> Result<String> {
        let (major, minor) = version()?;
        // The headers are part of what is compiled, so part of the key.
        let mut text = file.source.to_string();
        for h in kernel_headers() {
            text.push_str(h.source);
        }
        let key = format!(
            "{}-{:016x}-{}b-sm_{}-nvrtc{major}.{minor}-fmad{}.ptx",
            file.file.trim_end_matches(".cu"),
            fnv1a(text.as_bytes()),
            text.len(),
            options.arch,
            options.fmad as u8
        );
        let cached = self.dir.as_ref().map(|d| d.join(key));
        if let Some(ptx) = cached
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            return Ok(ptx);
        }
        let ptx = compile(file, options)?;
        if let Some(path) = cached {
            // A cache that cannot be written only costs a recompile next time.
            let _ = std::fs::create_dir_all(path.parent().unwrap()).and_then(|_| {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                std::fs::write(&tmp, &ptx)?;
                std::fs::rename(tmp, &path)
            });
        }
        Ok(ptx)
    }
}

/// What ptxas reports for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    pub stack_bytes: u32,
    pub shared_bytes: u32,
}

impl KernelResources {
    pub fn spill_bytes(&self) -> u32 {
        self.spill_store_bytes + self.spill_load_bytes
    }
}

/// The number just before `unit` in `line` ("64 registers" -> 64).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let end = line.find(unit)?;
    line[..end].split_whitespace().last()?.parse().ok()
}

fn parse_ptxas(output: &str) -> Vec<KernelResources> {
    let mut kernels: Vec<KernelResources> = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            kernels.push(KernelResources {
                kernel: rest.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(k) = kernels.last_mut() {
            if line.contains("spill stores") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    kernels
}

/// Runs `ptxas -arch=sm_XX -v` on `ptx` and returns the per-kernel resource usage.
pub fn ptxas_resources(ptxas: &Path, ptx: &str, arch: u32) -> Result<Vec<KernelResources>> {
    let io = |context: String| move |source| CudaError::Io { context, source };
    let dir = std::env::temp_dir().join(format!(
        "scalpel-ptxas-{}-{}",
        std::process::id(),
        fnv1a(ptx.as_bytes())
    ));
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let input = dir.join("kernels.ptx");
    std::fs::write(&input, ptx).map_err(io(format!("writing {}", input.display())))?;
    let output = Command::new(ptxas)
        .arg(format!("-arch=sm_{arch}"))
        .arg("-v")
        .arg(&input)
        .arg("-o")
        .arg(dir.join("kernels.cubin"))
        .output()
        .map_err(io(format!("running {}", ptxas.display())));
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    let text = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(CudaError::Nvrtc(format!(
            "ptxas -arch=sm_{arch} failed:\n{text}"
        )));
    }
    Ok(parse_ptxas(&text))
}

#[derive(Clone, Debug, Serialize)]
pub struct ArchCheck {
    pub arch: u32,
    /// The NVRTC error log when compilation failed.
    pub error: Option<String>,
    /// Per-kernel ptxas report; `None` when ptxas is not available.
    pub resources: Option<Vec<KernelResources>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FileCheck {
    pub file: &'static str,
    pub kernels: &'static [&'static str],
    pub archs: Vec<ArchCheck>,
}

/// Compiles every `kernels/*.cu` for each of `archs` through `cache` (what the GPU backend
/// loads) and, where ptxas is found, reads registers and spills per kernel. An error only when
/// NVRTC itself is unavailable; compile failures are reported per file and architecture.
pub fn compile_check(
    cache: &PtxCache,
    archs: &[u32],
    include: &dyn Fn(&str) -> bool,
) -> Result<Vec<FileCheck>> {
    version()?;
    let ptxas = Toolkit::discover().ptxas;
    let mut files = Vec::new();
    for file in kernel_files().iter().filter(|f| include(f.file)) {
        let mut results = Vec::new();
        for &arch in archs {
            let check = match cache.ptx(file, CompileOptions::new(arch)) {
                Err(CudaError::Unavailable(e)) => return Err(CudaError::Unavailable(e)),
                Err(e) => ArchCheck {
                    arch,
                    error: Some(e.to_string()),
                    resources: None,
                },
                Ok(ptx) => {
                    let (error, resources) =
                        match ptxas.as_deref().map(|p| ptxas_resources(p, &ptx, arch)) {
                            None => (None, None),
                            Some(Ok(r)) => (None, Some(r)),
                            Some(Err(e)) => (Some(e.to_string()), None),
                        };
                    ArchCheck {
                        arch,
                        error,
                        resources,
                    }
                }
            };
            results.push(check);
        }
        files.push(FileCheck {
            file: file.file,
            kernels: file.kernels,
            archs: results,
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let out = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'gemm_f32_nn' for 'sm_90'\n\
                   ptxas info    : Function properties for gemm_f32_nn\n\
                   \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 64 registers, used 1 barriers, 8320 bytes smem, 400 bytes cmem[0]\n";
        let k = &parse_ptxas(out)[0];
        assert_eq!(k.kernel, "gemm_f32_nn");
        assert_eq!((k.registers, k.shared_bytes, k.stack_bytes), (64, 8320, 8));
        assert_eq!(k.spill_bytes(), 16);
    }
}
