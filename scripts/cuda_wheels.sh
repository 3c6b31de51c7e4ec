#!/usr/bin/env bash
# Installs NVRTC, the CUDA headers NVRTC needs (cuda_fp16.h, cuda_bf16.h, mma.h and crt/mma.h) and
# ptxas from PyPI wheels into a git-ignored folder, so the CUDA backend's compile checks run on a
# machine with no CUDA toolkit. Prints the environment to export; use it as
#   eval "$(scripts/cuda_wheels.sh)"
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${SCALPEL_CUDA_WHEELS_DIR:-$root/.ci-cache/cuda}"
stamp="$target/.installed-cu12"

if [[ ! -f "$stamp" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$target" \
        "nvidia-cuda-nvrtc-cu12==12.9.*" "nvidia-cuda-runtime-cu12==12.9.*" "nvidia-cuda-nvcc-cu12==12.9.*" >&2
    touch "$stamp"
fi

nv="$target/nvidia"
echo "export LD_LIBRARY_PATH=\"$nv/cuda_nvrtc/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
# Read by scalpel-cuda: the folders passed to NVRTC as include paths, ':'-separated.
echo "export SCALPEL_CUDA_INCLUDE=\"$nv/cuda_runtime/include:$nv/cuda_nvcc/include\""
echo "export PATH=\"$nv/cuda_nvcc/bin:\$PATH\""
