#!/usr/bin/env bash
# scalpel vs PyTorch vs ONNX Runtime on the CPU: GEMM, MiniLM inference, a training step, peak
# RSS. Creates benches/compare/.venv (torch, transformers, onnx, onnxruntime) on first use,
# exports the model to ONNX once (into the venv folder), then alternates the frameworks and prints a ratio table.
# Extra arguments go to compare.py (e.g. --rounds 5 --runs 10, --only forward).
# COMPARE_VENV=DIR uses an existing environment that has those packages instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
here=benches/compare
venv=${COMPARE_VENV:-$here/.venv}
model=${SCALPEL_MODEL:-models/all-MiniLM-L6-v2}

if ! "$venv/bin/python" -c "import torch, transformers, onnx, onnxruntime" 2>/dev/null; then
    echo "creating $venv ..."
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # The CPU-only wheel is much smaller; fall back to PyPI's default build where the PyTorch
    # index is unreachable.
    "$venv/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu \
        || "$venv/bin/pip" install -q torch
    "$venv/bin/pip" install -q transformers onnx onnxruntime onnxscript
fi

[ -f "$model/model.safetensors" ] || scripts/fetch_model.sh
cargo build --release --quiet --bin scalpel
target=${CARGO_TARGET_DIR:-$root/target}
exec "$venv/bin/python" "$here/compare.py" --scalpel "$target/release/scalpel" \
    --model "$model" --onnx "$venv/minilm-l6-pooled.onnx" "$@"
