#!/usr/bin/env bash
# Fetches the 8×8 handwritten digits set (1797 images, UCI) that ships inside the scikit-learn
# wheel, into data/digits/digits.csv.gz (git-ignored). Idempotent: does nothing if present.
# Used by the MLP examples (examples/mlp_*.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=data/digits/digits.csv.gz
if [[ -s $dest ]]; then
    echo "$dest already present"
    exit 0
fi
mkdir -p data/digits
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" scikit-learn
wheel=$(ls "$tmp"/scikit_learn-*.whl | head -n1)
python3 - "$wheel" "$dest" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    data = z.read("sklearn/datasets/data/digits.csv.gz")
with open(dest + ".tmp", "wb") as f:
    f.write(data)
PY
mv "$dest.tmp" "$dest"
echo "wrote $dest"
