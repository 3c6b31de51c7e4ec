#!/usr/bin/env bash
# Overload check of `scalpel serve`: a closed-loop flood at concurrency 256 against
# --max-concurrent-requests 64 for SECONDS (default 60): every request must be answered 200 or
# 429 (counted; no connection error), the server healthy afterwards, its peak RSS (VmHWM)
# reported; then SIGTERM in the middle of a second flood must drain and exit 0.
#
#   SCALPEL_BIN=target/opt-test/scalpel benches/serve/flood.sh [SECONDS]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
here=benches/serve
seconds=${1:-60}
py=${SERVE_VENV:-/work/venvs/serve}/bin/python
scalpel=${SCALPEL_BIN:-${CARGO_TARGET_DIR:-target}/release/scalpel}
model=${SCALPEL_MODEL:-models/all-MiniLM-L6-v2}
sentences=$(mktemp)
trap 'kill "${pid:-}" 2>/dev/null || true; rm -f "$sentences"' EXIT
cut -f2,3 ../shared/data/sts/semeval-2015/*.test.tsv | tr '\t' '\n' | grep -v '^$' > "$sentences"
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

start() {
    "$scalpel" serve --model "$model" --device cpu --threads 2 --port "$port" \
        --max-concurrent-requests 64 --auto-truncate 2>/dev/null &
    pid=$!
    for _ in $(seq 600); do curl -sf "127.0.0.1:$port/health" >/dev/null && return 0; sleep 0.5; done
    echo "the server never became healthy" >&2; exit 1
}
flood() {  # bounded: $1 seconds, at most 10^6 requests
    "$py" $here/loadgen.py --url "http://127.0.0.1:$port" --concurrency 256 --requests 1000000 \
        --seconds "$1" --warmup 0 --sentences "$sentences"
}

start
echo "flood: 256 clients, --max-concurrent-requests 64, ${seconds} s"
flood "$seconds"
echo "health after: $(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$port/health")"
echo "peak RSS: $(awk '/VmHWM/ {printf "%.1f MB", $2 / 1024}' /proc/$pid/status)"
kill -TERM "$pid"; wait "$pid" && echo "exit after SIGTERM (idle): 0"

start
flood 20 &
flooder=$!
sleep 10
kill -TERM "$pid"
status=0; wait "$pid" || status=$?
echo "exit after SIGTERM mid-flood: $status"
wait "$flooder" || true
