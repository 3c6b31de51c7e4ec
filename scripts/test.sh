#!/usr/bin/env bash
# Every test: fetch the models (MiniLM, SmolLM2) and the NVRTC wheels if absent (all idempotent),
# run the workspace tests with optimisation on (Cargo.toml's `opt-test` profile), then the kernel
# report (NVRTC compile for sm_80/sm_90, ptxas spills, every kernel on the CPU emulator against the
# CPU backend),
# which exits non-zero on any failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/fetch_model.sh
scripts/fetch_smollm2.sh
eval "$(scripts/cuda_wheels.sh)"
cargo test --profile opt-test --workspace
# The binary the tests just built: `cargo run` would rebuild the workspace, because the tests
# compile scalpel-cuda with its test-only planted-kernels feature (never listed in the report).
"${CARGO_TARGET_DIR:-target}/opt-test/scalpel" kernels
# The CPU-only build (no `cuda` feature) must keep compiling, its tests included.
cargo check --profile opt-test -p scalpel --no-default-features --all-targets
