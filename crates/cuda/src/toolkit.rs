//! Where the CUDA compile-time pieces are: NVRTC's library, the headers it needs, and ptxas.
//!
//! They come from PyPI wheels (`scripts/cuda_wheels.sh`) or a CUDA toolkit. Looked up, in order:
//! `SCALPEL_CUDA_WHEELS_DIR` (a `pip install --target` folder), the workspace's `.ci-cache/cuda`
//! where the script installs them, then `CUDA_HOME`/`CUDA_PATH` and `/usr/local/cuda`.
//! `SCALPEL_CUDA_INCLUDE` (':'-separated) overrides the include folders.

use std::path::{Path, PathBuf};

/// The folder `scripts/cuda_wheels.sh` installs into by default.
const WORKSPACE_WHEELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.ci-cache/cuda");

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Toolkit {
    /// `libnvrtc.so.12` by absolute path; `None` leaves it to the loader's search path.
    pub nvrtc_library: Option<PathBuf>,
    /// Passed to NVRTC as include paths (`cuda_fp16.h`, `cuda_bf16.h`, `mma.h`, `crt/mma.h`).
    pub include_dirs: Vec<PathBuf>,
    pub ptxas: Option<PathBuf>,
}

fn existing(p: PathBuf) -> Option<PathBuf> {
    p.exists().then_some(p)
}

impl Toolkit {
    pub fn discover() -> Toolkit {
        let mut wheel_roots: Vec<PathBuf> = std::env::var_os("SCALPEL_CUDA_WHEELS_DIR")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        wheel_roots.push(PathBuf::from(WORKSPACE_WHEELS));
        let toolkit_roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
            .iter()
            .filter_map(std::env::var_os)
            .map(PathBuf::from)
            .chain([PathBuf::from("/usr/local/cuda")])
            .collect();

        let nvrtc_library = wheel_roots
            .iter()
            .map(|r| r.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
            .chain(toolkit_roots.iter().map(|r| r.join("lib64/libnvrtc.so.12")))
            .find_map(existing);

        let include_dirs = match std::env::var("SCALPEL_CUDA_INCLUDE") {
            Ok(dirs) if !dirs.is_empty() => std::env::split_paths(&dirs).collect(),
            _ => wheel_roots
                .iter()
                .find(|r| r.join("nvidia/cuda_runtime/include/cuda_fp16.h").exists())
                .map(|r| {
                    vec![
                        r.join("nvidia/cuda_runtime/include"),
                        r.join("nvidia/cuda_nvcc/include"),
                    ]
                })
                .or_else(|| {
                    toolkit_roots
                        .iter()
                        .find(|r| r.join("include/cuda_fp16.h").exists())
                        .map(|r| vec![r.join("include")])
                })
                .unwrap_or_default(),
        };

        let on_path = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("ptxas"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let ptxas = wheel_roots
            .iter()
            .map(|r| r.join("nvidia/cuda_nvcc/bin/ptxas"))
            .chain(on_path)
            .chain(toolkit_roots.iter().map(|r| r.join("bin/ptxas")))
            .find_map(existing);

        Toolkit {
            nvrtc_library,
            include_dirs,
            ptxas,
        }
    }

    /// The headers the kernels include that no include folder holds.
    pub fn missing_headers(&self) -> Vec<&'static str> {
        ["cuda_fp16.h", "cuda_bf16.h", "mma.h", "crt/mma.h"]
            .into_iter()
            .filter(|h| {
                !self
                    .include_dirs
                    .iter()
                    .any(|d| Path::new(d).join(h).exists())
            })
            .collect()
    }
}
