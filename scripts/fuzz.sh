#!/usr/bin/env bash
# Mutation fuzzing of every parser behind a model folder, a checkpoint and a GGUF file
# (examples/fuzz.rs), on the stable toolchain: each target runs for MINUTES (default 5) or a
# million executions, whichever comes first, and the script prints a table of executions per
# target. Exits non-zero on any panic, hang or oversized allocation; the failing inputs are in
# target/fuzz/ (after an abort, such as a failed allocation, the input is the target's file in
# the /dev/shm folder the run names).
#   scripts/fuzz.sh [MINUTES] [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
minutes=${1:-5}
shift || true
scripts/fetch_model.sh
cargo build --profile opt-test --features fuzz --example fuzz
"${CARGO_TARGET_DIR:-target}/opt-test/examples/fuzz" --minutes "$minutes" --execs 1000000 "$@"
