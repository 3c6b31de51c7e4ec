//! The `scalpel kernels` report: per kernel, whether NVRTC compiles it for sm_80 and sm_90, its
//! registers and spills from ptxas, and its largest error against the CPU reference on the
//! emulator.

use serde::Serialize;

use crate::check::KernelCheck;
use crate::nvrtc::{compile_check, FileCheck, PtxCache, CHECKED_ARCHS};
use crate::sources::kernel_files;
use crate::Runtime;

#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub name: String,
    pub file: String,
    /// Whether NVRTC compiled it for that architecture; `None` when NVRTC is unavailable.
    pub sm_80: Option<bool>,
    pub sm_90: Option<bool>,
    /// Registers per thread on sm_90, from ptxas.
    pub registers: Option<u32>,
    /// Spill stores plus loads, the most over both architectures, from ptxas.
    pub spill_bytes: Option<u32>,
    /// The largest error over the emulator checks of this kernel; `None` if none covers it.
    pub emu_max_rel_err: Option<f64>,
    pub tolerance: Option<f64>,
    /// Every known result is good: compiled, no spills, within tolerance (and checked at all).
    pub pass: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelsReport {
    pub nvrtc_version: Option<String>,
    pub ptxas: bool,
    /// Why a column is empty, or a check that could not run.
    pub notes: Vec<String>,
    pub kernels: Vec<KernelReport>,
}

impl KernelsReport {
    pub fn all_pass(&self) -> bool {
        self.kernels.iter().all(|k| k.pass)
    }

    /// A fixed-width table for the terminal.
    pub fn to_table(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let yes_no = |v: Option<bool>| opt(v.map(|b| if b { "ok" } else { "FAIL" }.into()));
        let mut out = format!(
            "{:<32} {:<16} {:>5} {:>5} {:>5} {:>6} {:>10} {:>5}\n",
            "kernel", "file", "sm_80", "sm_90", "regs", "spills", "emu error", "pass"
        );
        for k in &self.kernels {
            out += &format!(
                "{:<32} {:<16} {:>5} {:>5} {:>5} {:>6} {:>10} {:>5}\n",
                k.name,
                k.file,
                yes_no(k.sm_80),
                yes_no(k.sm_90),
                opt(k.registers.map(|r| r.to_string())),
                opt(k.spill_bytes.map(|r| r.to_string())),
                opt(k.emu_max_rel_err.map(|e| format!("{e:.2e}"))),
                if k.pass { "yes" } else { "NO" }
            );
        }
        for note in &self.notes {
            out += &format!("note: {note}\n");
        }
        out
    }
}

/// Builds the report for the kernel files whose name contains `only` (every file when `None`):
/// the NVRTC compile check (when NVRTC is present) and the emulator checks.
pub fn kernels_report(only: Option<&str>) -> KernelsReport {
    let include = |file: &str| only.is_none_or(|o| file.contains(o));
    let mut notes = Vec::new();
    let nvrtc_version = crate::nvrtc::version()
        .ok()
        .map(|(major, minor)| format!("{major}.{minor}"));
    let compiled: Vec<FileCheck> =
        match compile_check(&PtxCache::default_location(), &CHECKED_ARCHS, &include) {
            Ok(files) => files,
            Err(e) => {
                notes.push(format!("no NVRTC compile check: {e}"));
                Vec::new()
            }
        };
    let ptxas = compiled
        .iter()
        .flat_map(|f| &f.archs)
        .any(|a| a.resources.is_some());
    if !compiled.is_empty() && !ptxas {
        notes.push(
            "no register or spill counts: ptxas not found (nvidia-cuda-nvcc-cu12 wheel)".into(),
        );
    }
    for arch in compiled.iter().flat_map(|f| &f.archs) {
        if let Some(e) = &arch.error {
            notes.push(e.clone());
        }
    }
    let checks: Vec<KernelCheck> = match crate::check::all(&Runtime::emulator(), &include) {
        Ok(checks) => checks,
        Err(e) => {
            notes.push(format!("emulator checks stopped: {e}"));
            Vec::new()
        }
    };

    let mut kernels = Vec::new();
    for file in kernel_files().iter().filter(|f| include(f.file)) {
        let compile = compiled.iter().find(|f| f.file == file.file);
        for &kernel in file.kernels {
            let arch = |a: u32| compile.and_then(|f| f.archs.iter().find(|x| x.arch == a));
            // Compiled means NVRTC produced PTX; a ptxas failure is reported as an error too.
            let ok = |a: u32| arch(a).map(|x| x.error.is_none());
            let resources = |a: u32| {
                arch(a)
                    .and_then(|x| x.resources.as_ref())
                    .and_then(|r| r.iter().find(|k| k.kernel == kernel).cloned())
            };
            let registers = resources(90).map(|r| r.registers);
            let spill_bytes = CHECKED_ARCHS
                .iter()
                .filter_map(|&a| resources(a).map(|r| r.spill_bytes()))
                .max();
            let mine: Vec<&KernelCheck> = checks.iter().filter(|c| c.kernel == kernel).collect();
            let error = mine.iter().map(|c| c.max_rel_error).reduce(|a, b| {
                if a.is_nan() || b.is_nan() {
                    f64::NAN
                } else {
                    a.max(b)
                }
            });
            let tolerance = mine.first().map(|c| c.tolerance);
            let pass = !mine.is_empty()
                && mine.iter().all(|c| c.passed())
                && CHECKED_ARCHS.iter().all(|&a| ok(a) != Some(false))
                && spill_bytes.unwrap_or(0) == 0;
            kernels.push(KernelReport {
                name: kernel.to_string(),
                file: format!("kernels/{}", file.file),
                sm_80: ok(80),
                sm_90: ok(90),
                registers,
                spill_bytes,
                emu_max_rel_err: error,
                tolerance,
                pass,
            });
        }
    }
    KernelsReport {
        nvrtc_version,
        ptxas,
        notes,
        kernels,
    }
}
