use super::CliResult;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Only the kernel files whose name contains this, e.g. `attention`.
    #[arg(long)]
    only: Option<String>,
}

/// Compiles every kernel through NVRTC (where it can be loaded), runs each on the emulator
/// against the CPU backend, and fails if any kernel fails.
#[cfg(feature = "cuda")]
pub fn run(a: Args) -> CliResult {
    let report = scalpel::cuda::report::kernels_report(a.only.as_deref());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    if !report.all_pass() {
        return Err("at least one kernel failed (see the table)".into());
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
pub fn run(_: Args) -> CliResult {
    Err("this scalpel was built without the `cuda` feature: it has no CUDA kernels".into())
}
