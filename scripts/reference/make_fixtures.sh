#!/usr/bin/env bash
# Regenerate tests/fixtures/ from PyTorch / transformers / sentence-transformers.
#
# Developers run this by hand; CI never does (it only reads the committed fixtures).
#
#   scripts/reference/make_fixtures.sh [make_fixtures.py args...]   e.g. --model DIR, --only ops
#
# Environment:
#   REF_PYTHON  use this Python (with the packages already installed) instead of the managed venv
#   REF_VENV    where to create the managed venv (default: <repo>/.venv-ref, git-ignored)
#   PYTHON      interpreter used to create the venv (default: python3)
#   PIP_ARGS    extra pip install arguments, e.g. "--index-url https://download.pytorch.org/whl/cpu"
#               to get the much smaller CPU-only torch wheel
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

# The versions the committed fixtures were generated with (see tests/fixtures/README.md).
PINS=(
  "torch==2.15.0"
  "transformers==5.23.0"
  "sentence-transformers==6.2.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
)

if [[ -n "${REF_PYTHON:-}" ]]; then
  py="$REF_PYTHON"
else
  venv="${REF_VENV:-$repo/.venv-ref}"
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --upgrade pip
    # shellcheck disable=SC2086  # PIP_ARGS is deliberately word-split
    "$venv/bin/python" -m pip install ${PIP_ARGS:-} "${PINS[@]}"
  fi
  py="$venv/bin/python"
fi

cd "$repo"
# One thread keeps the numbers reproducible and the machine usable.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec "$py" "$here/make_fixtures.py" "$@"
