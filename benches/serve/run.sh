#!/usr/bin/env bash
# scalpel serve vs sentence-transformers and ONNX Runtime behind FastAPI/uvicorn, on loopback:
# the same model, the same thread count, the same requests (one STS 2015 sentence each), at
# concurrency 1, 8 and 64; the three servers take turns at each level. Prints p50/p90/p99,
# requests/s, sentences/s and the ratios against scalpel.
#
#   benches/serve/run.sh [--threads 2] [--requests 400] [--seconds 60]
#
# SERVE_VENV=DIR (default /work/venvs/serve) needs torch, sentence-transformers, fastapi,
# uvicorn, onnx, onnxruntime (see the README of this folder). Every server is stopped on exit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
here=benches/serve
venv=${SERVE_VENV:-/work/venvs/serve}
model=${SCALPEL_MODEL:-models/all-MiniLM-L6-v2}
threads=2 requests=400 seconds=60
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads=$2; shift 2 ;;
        --requests) requests=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
py="$venv/bin/python"
"$py" -c "import torch, sentence_transformers, fastapi, uvicorn, onnxruntime" \
    || { echo "$venv lacks the Python packages (see $here/README.md)" >&2; exit 1; }
[ -f "$model/model.safetensors" ] || scripts/fetch_model.sh
target=${CARGO_TARGET_DIR:-$root/target}
# SCALPEL_BIN=PATH uses an already built binary (e.g. target/opt-test/scalpel) instead.
scalpel=${SCALPEL_BIN:-$target/release/scalpel}
[ -n "${SCALPEL_BIN:-}" ] || cargo build --release --quiet --bin scalpel
onnx=${SERVE_ONNX:-$venv/minilm-l6-pooled.onnx}

# Real sentences: both sides of every STS 2015 pair, in file order.
sentences=$(mktemp)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -f "$sentences"
}
trap cleanup EXIT
cut -f2,3 ../shared/data/sts/semeval-2015/*.test.tsv | tr '\t' '\n' | grep -v '^$' > "$sentences"

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_healthy() {  # bounded: 300 s for a model load (and the ONNX export on first use)
    for _ in $(seq 600); do
        "$py" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=1)" 2>/dev/null && return 0
        sleep 0.5
    done
    echo "server on port $1 never became healthy" >&2; exit 1
}

declare -A port
port[scalpel]=$(free_port)
SCALPEL_THREADS=$threads "$scalpel" serve --model "$model" --device cpu \
    --threads "$threads" --port "${port[scalpel]}" --auto-truncate 2>/dev/null &
pids+=($!)
# PASSIVE: FastAPI runs each request on one of its pool's threads, and each thread that calls
# torch gets its own OpenMP team, whose idle threads spin: with the default policy the
# sentence-transformers server's p50 at concurrency 1 was 791 ms here, with PASSIVE 40 ms.
export OMP_WAIT_POLICY=PASSIVE
port[st]=$(free_port)
OMP_NUM_THREADS=$threads "$py" $here/py_server.py --backend st --model "$model" --threads "$threads" --port "${port[st]}" &
pids+=($!)
port[ort]=$(free_port)
OMP_NUM_THREADS=$threads "$py" $here/py_server.py --backend ort --model "$model" --threads "$threads" --port "${port[ort]}" --onnx "$onnx" &
pids+=($!)
for s in scalpel st ort; do wait_healthy "${port[$s]}"; done

"$py" $here/check_clients.py --url "http://127.0.0.1:${port[scalpel]}" --model "$model" --sentences "$sentences"
echo "load: $(uptime | sed 's/.*load average/load average/'), $(nproc) cores, $threads threads per server"
results=$(mktemp)
for c in 1 8 64; do
    n=$(( requests > 16 * c ? requests : 16 * c ))
    for s in scalpel st ort; do
        "$py" $here/loadgen.py --url "http://127.0.0.1:${port[$s]}" --concurrency "$c" \
            --requests "$n" --seconds "$seconds" --sentences "$sentences" --json \
            | sed "s/^{/{\"server\": \"$s\", /" >> "$results"
    done
done
"$py" - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["server"], r["concurrency"]): r for r in rows}
names = {"scalpel": "scalpel serve", "st": "sentence-transformers + FastAPI", "ort": "ONNX Runtime + FastAPI"}
print("| server | concurrency | p50 ms | p90 ms | p99 ms | requests/s | sentences/s | answered (statuses) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for c in (1, 8, 64):
    for s in ("scalpel", "st", "ort"):
        r = by[(s, c)]
        print(f"| {names[s]} | {c} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
              f"{r['requests_per_s']:.1f} | {r['sentences_per_s']:.1f} | {r['statuses']} |")
print()
print("| concurrency | req/s scalpel / sentence-transformers | req/s scalpel / ORT | p99 scalpel / sentence-transformers | p99 scalpel / ORT |")
print("| --- | --- | --- | --- | --- |")
for c in (1, 8, 64):
    sc, st, ort = by[("scalpel", c)], by[("st", c)], by[("ort", c)]
    print(f"| {c} | {sc['requests_per_s'] / st['requests_per_s']:.2f} | {sc['requests_per_s'] / ort['requests_per_s']:.2f} | "
          f"{sc['p99_ms'] / st['p99_ms']:.2f} | {sc['p99_ms'] / ort['p99_ms']:.2f} |")
PY
rm -f "$results"
