//! Builds the CPU emulator: compiles every `kernels/*.cu` (plus the planted-bug kernels under
//! `tests/kernels/` for this crate's tests) as host C++ against `emu/shim.h`, and generates
//!
//! * a launch table, so the emulator launches kernels by name with a `void**` argument array
//!   exactly like `cuLaunchKernel`;
//! * `kernel_sources.rs`, which embeds the production sources and their kernel names for the
//!   NVRTC path, and `kernel_headers.rs`, the shared `kernels/*.cuh` they include;
//! * `launchers/<family>.rs`, one typed Rust launcher per entry point of `kernels/<family>.cu`,
//!   generated from its parameter list, so the host side cannot disagree with the `.cu` on the
//!   number, order, type or constness of the arguments.
//!
//! The only source rewrites are the two shared-memory forms host C++ cannot express; each keeps
//! the line count so compiler messages and barrier sites point at the original `.cu` lines.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use regex::Regex;

struct KernelFile {
    path: PathBuf,
    stem: String,
    kernels: Vec<Kernel>,
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

/// One parameter of an entry point, as the Rust launcher takes it.
enum Param {
    /// `int`: a size, passed as `usize` and checked to fit.
    Int(String),
    /// `float`.
    Float(String),
    /// `unsigned`: a 32-bit word (a hash seed's half, a threshold), passed as `u32`.
    Unsigned(String),
    /// `const T*` (`output` false) or `T*`, with `T`'s Rust element type.
    Pointer {
        name: String,
        element: &'static str,
        output: bool,
    },
}

struct Kernel {
    name: String,
    /// The `.cu` line the entry point starts on, and its parameter list as written there.
    line: usize,
    signature: String,
    params: Vec<Param>,
}

/// The Rust element type of a kernel pointer's C element type.
fn element_type(c: &str) -> Option<&'static str> {
    Some(match c {
        "float" => "f32",
        "int" => "i32",
        "unsigned" => "u32",
        "__half" => "half::f16",
        "__nv_bfloat16" => "half::bf16",
        // `typedef unsigned long long device_address`: a pointer or length in a device table.
        "device_address" => "u64",
        _ => return None,
    })
}

fn parse_param(path: &Path, kernel: &str, text: &str) -> Param {
    let fail = |why: &str| -> ! {
        panic!(
            "{}: {kernel}: parameter `{text}`: {why} (the launcher generator takes int, float, \
             unsigned and [const] float/int/unsigned/__half/__nv_bfloat16/device_address pointers)",
            path.display()
        )
    };
    let pointer = text.contains('*');
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '*')
        .filter(|w| !w.is_empty() && *w != "__restrict__")
        .collect();
    let output = !words.contains(&"const");
    let words: Vec<&str> = words.into_iter().filter(|w| *w != "const").collect();
    let [ty, name] = words[..] else {
        fail("not `type name`")
    };
    let name = name.to_string();
    if ["rt", "config"].contains(&name.as_str()) {
        fail("the launcher's own arguments are named rt and config");
    }
    match (pointer, ty) {
        (false, "int") => Param::Int(name),
        (false, "float") => Param::Float(name),
        (false, "unsigned") => Param::Unsigned(name),
        (true, _) => Param::Pointer {
            name,
            element: element_type(ty).unwrap_or_else(|| fail("unknown element type")),
            output,
        },
        _ => fail("unknown scalar type"),
    }
}

fn kernels_of(path: &Path, source: &str) -> Vec<Kernel> {
    let entry = Regex::new(
        r#"extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)"#,
    )
    .unwrap();
    entry
        .captures_iter(source)
        .map(|c| {
            let name = c[1].to_string();
            let list = c[2].split_whitespace().collect::<Vec<_>>().join(" ");
            let params = if list.is_empty() || list == "void" {
                Vec::new()
            } else {
                list.split(',')
                    .map(|p| parse_param(path, &name, p.trim()))
                    .collect()
            };
            Kernel {
                line: source[..c.get(0).unwrap().start()].lines().count() + 1,
                signature: format!("{name}({list})"),
                name,
                params,
            }
        })
        .collect()
}

/// The typed launchers of one kernel file: per entry point an `unsafe fn` taking the runtime,
/// the launch configuration and the kernel's parameters in order (`usize` for `int`, `u32` for
/// `unsigned`, `f32` for `float`, [`DeviceIn`]/[`DeviceOut`] for `const T*`/`T*`), which builds
/// the argument array.
fn launchers(file: &str, kernels: &[Kernel]) -> String {
    let mut out = String::new();
    for k in kernels {
        let mut params = String::new();
        let mut args = Vec::new();
        for p in &k.params {
            match p {
                Param::Int(name) => {
                    let _ = write!(params, ", {name}: usize");
                    args.push(format!("crate::kernels::int({name:?}, {name})?"));
                }
                Param::Float(name) => {
                    let _ = write!(params, ", {name}: f32");
                    args.push(format!("crate::KernelArg::F32({name})"));
                }
                Param::Unsigned(name) => {
                    let _ = write!(params, ", {name}: u32");
                    args.push(format!("crate::KernelArg::U32({name})"));
                }
                Param::Pointer {
                    name,
                    element,
                    output,
                } => {
                    let kind = if *output { "DeviceOut" } else { "DeviceIn" };
                    let _ = write!(params, ", {name}: crate::{kind}<'_, {element}>");
                    args.push(format!("{name}.arg()"));
                }
            }
        }
        let _ = write!(
            out,
            "/// `{}` (kernels/{file}:{}).\n\
             ///\n\
             /// # Safety\n\
             /// `config` and the size arguments must keep every thread inside the buffers given.\n\
             #[allow(clippy::too_many_arguments)]\n\
             pub(crate) unsafe fn {}(rt: &crate::Runtime, config: crate::LaunchConfig{params}) -> crate::Result<()> {{\n    \
             // SAFETY: the arguments are this kernel's parameters in order and type; the caller\n    \
             // answers for the bounds.\n    \
             unsafe {{ rt.launch({:?}, config, &[{}]) }}\n}}\n\n",
            k.signature,
            k.line,
            k.name,
            k.name,
            args.join(", ")
        );
    }
    out
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
            let kernels = kernels_of(&path, &source);
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
                    "    {{\"{0}\", [](void** args) {{ ::emu::invoke({0}, args); }}}},",
                    k.name
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
    let launcher_dir = out.join("launchers");
    std::fs::create_dir_all(&launcher_dir).unwrap();
    for f in files.iter().filter(|f| f.production) {
        let names: Vec<&str> = f.kernels.iter().map(|k| k.name.as_str()).collect();
        let _ = writeln!(
            sources,
            "KernelFile {{ file: \"{}.cu\", source: include_str!({:?}), kernels: &{:?} }},",
            f.stem,
            f.path.display().to_string(),
            names
        );
        let file = format!("{}.cu", f.stem);
        std::fs::write(
            launcher_dir.join(format!("{}.rs", f.stem)),
            launchers(&file, &f.kernels),
        )
        .unwrap();
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
