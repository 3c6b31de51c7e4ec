//! The `scalpel` command line: one subcommand per file in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// Tensor buffers start on a cache line, and large freed ones are reused (see
/// [`scalpel::tensor::heap::TensorHeap`]).
#[global_allocator]
static ALLOCATOR: scalpel::tensor::heap::TensorHeap = scalpel::tensor::heap::TensorHeap;

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
