//! Builds the CPU emulator: compiles every `kernels/*.cu` (plus the planted-bug kernels under
//! `tests/kernels/` for this crate's tests) as host C++ against `emu/shim.h`, and generates
//!
//! * a launch table, so the emulator launches kernels by name with a `void**` argument array
//!   exactly like `cuLaunchKernel`;
//! * `kernel_sources.rs`, which embeds the production sources and their kernel names for the
//!   NVRTC path, and `kernel_headers.rs`, the shared `kernels/*.cuh` they include.
//!
//! The only source rewrites are the two shared-memory forms host C++ cannot express; each keeps
//! the line count so compiler messages and barrier sites point at the original `.cu` lines.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use regex::Regex;

struct KernelFile {
    path: PathBuf,
    stem: String,
    kernels: Vec<String>,
    /// From `kernels/` (compiled by NVRTC too), not a planted-bug test kernel.
    production: bool,
    emulator_unit: PathBuf,
}

fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    files.sort();
    files
}

fn kernel_names(source: &str) -> Vec<String> {
    let entry = Regex::new(
        r#"extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\("#,
    )
    .unwrap();
    entry
        .captures_iter(source)
        .map(|c| c[1].to_string())
        .collect()
}

/// `__shared__ T x[A][B];` becomes a reference to storage the emulator refills before each
/// block; `extern __shared__ T x[];` a pointer into the launch's dynamic shared buffer.
fn rewrite_shared(path: &Path, source: &str, file_index: usize) -> String {
    let dynamic = Regex::new(
        r"(?m)^(\s*)extern\s+__shared__\s+(?:(?:__align__|alignas)\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*)\s+(\w+)\s*\[\s*\]\s*;",
    )
    .unwrap();
    let fixed = Regex::new(
        r"(?m)^(\s*)__shared__\s+(?:(?:__align__|alignas)\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*)\s+(\w+)\s*((?:\[[^\]\n]+\])*)\s*;",
    )
    .unwrap();
    let source = dynamic.replace_all(
        source,
        "${1}${2}* ${3} = reinterpret_cast<${2}*>(::emu::dynamic_shared());",
    );
    let mut id = 0;
    let source = fixed.replace_all(&source, |c: &regex::Captures| {
        id += 1;
        format!(
            "{}auto& {} = ::emu::static_shared<{}{}, {}>();",
            &c[1],
            &c[3],
            &c[2],
            &c[4],
            file_index * 1000 + id
        )
    });
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap();
        assert!(
            !code.contains("__shared__"),
            "{}:{}: a __shared__ declaration the emulator cannot rewrite (put it on one line as \
             `__shared__ T name[N]...;` or `extern __shared__ T name[];`)",
            path.display(),
            n + 1
        );
    }
    source.into_owned()
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels_dir = manifest
        .join("../../kernels")
        .canonicalize()
        .expect("kernels/ folder at the workspace root");
    let emu_dir = manifest.join("emu");
    let planted_dir = manifest.join("tests/kernels");
    println!("cargo:rerun-if-changed={}", kernels_dir.display());
    println!("cargo:rerun-if-changed={}", emu_dir.display());
    println!("cargo:rerun-if-changed={}", planted_dir.display());

    let mut files: Vec<KernelFile> = Vec::new();
    let mut dirs = vec![(kernels_dir.clone(), true)];
    if std::env::var_os("CARGO_FEATURE_PLANTED_KERNELS").is_some() {
        dirs.push((planted_dir, false));
    }
    let generated = out.join("emu");
    std::fs::create_dir_all(&generated).unwrap();
    for (dir, production) in dirs {
        for path in cu_files(&dir) {
            println!("cargo:rerun-if-changed={}", path.display());
            let source = std::fs::read_to_string(&path).unwrap();
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            let kernels = kernel_names(&source);
            let index = files.len() + 1;
            let mut unit = format!(
                "#line 1 \"{}\"\n{}\n",
                path.display(),
                rewrite_shared(&path, &source, index)
            );
            unit.push_str("namespace emu {\nextern const KernelEntry kernels_");
            let _ = writeln!(unit, "{stem}[] = {{");
            for k in &kernels {
                let _ = writeln!(
                    unit,
                    "    {{\"{k}\", [](void** args) {{ ::emu::invoke({k}, args); }}}},"
                );
            }
            unit.push_str("    {nullptr, nullptr}};\n}\n");
            let emulator_unit = generated.join(format!("{stem}.cpp"));
            std::fs::write(&emulator_unit, unit).unwrap();
            files.push(KernelFile {
                path,
                stem,
                kernels,
                production,
                emulator_unit,
            });
        }
    }

    let mut table = String::from("#include \"shim.h\"\n#include <cstring>\nnamespace emu {\n");
    for f in &files {
        let _ = writeln!(table, "extern const KernelEntry kernels_{}[];", f.stem);
    }
    table.push_str(
        "const KernelEntry* find_kernel(const char* name) {\n    for (const KernelEntry* t : {",
    );
    for f in &files {
        let _ = write!(table, "kernels_{}, ", f.stem);
    }
    table.push_str(
        "})\n        for (; t->name; ++t)\n            if (std::strcmp(t->name, name) == 0) return t;\n    return nullptr;\n}\n}\n",
    );
    let table_path = generated.join("launch_table.cpp");
    std::fs::write(&table_path, table).unwrap();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(&emu_dir)
        // The shared device headers (`#include "warp.cuh"`).
        .include(&kernels_dir)
        .include(emu_dir.join("include"))
        .flag("-include")
        .flag(emu_dir.join("shim.h").to_str().unwrap())
        .flag("-pthread")
        // The CPU references do no contraction; neither may the emulated kernels.
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        // CUDA idioms host compilers warn about: `#pragma unroll`, int vs threadIdx comparisons.
        .flag("-Wno-unknown-pragmas")
        .flag("-Wno-sign-compare")
        .opt_level(2)
        .file(emu_dir.join("runtime.cpp"))
        .file(&table_path);
    for f in &files {
        build.file(&f.emulator_unit);
    }
    build.compile("scalpel_cuda_emu");

    let mut sources = String::new();
    for f in files.iter().filter(|f| f.production) {
        let _ = writeln!(
            sources,
            "KernelFile {{ file: \"{}.cu\", source: include_str!({:?}), kernels: &{:?} }},",
            f.stem,
            f.path.display().to_string(),
            f.kernels
        );
    }
    std::fs::write(out.join("kernel_sources.rs"), format!("&[\n{sources}]\n")).unwrap();

    // Headers the kernel files include, handed to NVRTC from memory.
    let mut headers = String::new();
    for path in std::fs::read_dir(&kernels_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
    {
        if path.extension().is_some_and(|x| x == "cuh") {
            println!("cargo:rerun-if-changed={}", path.display());
            let _ = writeln!(
                headers,
                "KernelHeader {{ name: {:?}, source: include_str!({:?}) }},",
                path.file_name().unwrap().to_str().unwrap(),
                path.display().to_string()
            );
        }
    }
    std::fs::write(out.join("kernel_headers.rs"), format!("&[\n{headers}]\n")).unwrap();
}
