//! The `scalpel` command line: one subcommand per file in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Tensor buffers start on a cache line (see [`scalpel::tensor::heap::CacheLineAligned`]).
#[global_allocator]
static ALLOCATOR: scalpel::tensor::heap::CacheLineAligned = scalpel::tensor::heap::CacheLineAligned;

fn main() -> ExitCode {
    scalpel::tensor::heap::keep_freed_buffers();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
