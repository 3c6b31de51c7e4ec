//! Every kernels/*.cu compiles with NVRTC for sm_80 and sm_90 through the crate's own compile
//! path, and (where ptxas is present) no kernel spills. Needs the NVRTC wheels
//! (`eval "$(scripts/cuda_wheels.sh)"`): without NVRTC this test fails, it does not skip.

use scalpel_cuda::nvrtc::{compile_check, CompileOptions, PtxCache, CHECKED_ARCHS};
use scalpel_cuda::{kernel_files, Toolkit};

#[test]
fn every_kernel_file_compiles_for_sm80_and_sm90_without_spills() {
    let files = compile_check(&PtxCache::default_location(), &CHECKED_ARCHS, &|_| true).unwrap_or_else(|e| {
        panic!("NVRTC compile check could not run: {e}\n(install the wheels: eval \"$(scripts/cuda_wheels.sh)\")")
    });
    assert_eq!(files.len(), kernel_files().len());
    let ptxas = Toolkit::discover().ptxas.is_some();
    let mut failures = Vec::new();
    for file in &files {
        for arch in &file.archs {
            if let Some(e) = &arch.error {
                failures.push(format!("{} sm_{}: {e}", file.file, arch.arch));
            }
            let Some(resources) = &arch.resources else {
                continue;
            };
            for kernel in file.kernels {
                match resources.iter().find(|r| r.kernel == *kernel) {
                    None => {
                        failures.push(format!("{kernel} sm_{}: not in ptxas's report", arch.arch))
                    }
                    Some(r) if r.spill_bytes() > 0 => failures.push(format!(
                        "{kernel} sm_{}: {} spill bytes",
                        arch.arch,
                        r.spill_bytes()
                    )),
                    Some(r) => eprintln!(
                        "{kernel:32} sm_{}: {:3} registers, {:5} B smem",
                        arch.arch, r.registers, r.shared_bytes
                    ),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if !ptxas {
        eprintln!("ptxas not found: spill counts not checked");
    }
}

#[test]
fn ptx_cache_returns_the_compiled_ptx() {
    let dir = std::env::temp_dir().join(format!("scalpel-ptx-cache-test-{}", std::process::id()));
    let cache = PtxCache::at(&dir);
    let file = &kernel_files()[0];
    let options = CompileOptions::new(90);
    let first = cache
        .ptx(file, options)
        .unwrap_or_else(|e| panic!("NVRTC unavailable: {e}"));
    assert!(first.contains(".target sm_90"));
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "one cache entry written");
    // A hit is served from disk: plant a marker in the entry and read it back.
    std::fs::write(&entries[0], format!("{first}// cached")).unwrap();
    assert!(cache.ptx(file, options).unwrap().ends_with("// cached"));
    std::fs::remove_dir_all(&dir).unwrap();
}
