#!/usr/bin/env bash
# The GPU check, in two halves, because the GPU machine has no Rust toolchain and no network:
#
#   scripts/gpu_check.sh prepare   here: release binaries (the CLI and the device tests), the
#                                  model in f16 (half the bytes; scalpel widens it on load) and a
#                                  4-layer cut, packed into .gpu/ (git-ignored, < 64 MiB)
#   scripts/gpu_check.sh run       there, from the repo root with .gpu carried (device tool:
#                                  `run` with carry [".gpu"], timeout 480 s): under 8 minutes on
#                                  one H100/H200, prints one JSON object and writes it to
#                                  $OUT/gpu_check.json
#
# `run` does: the device tests with the GPU as their device (SCALPEL_EXPECT_GPU: the same test
# bodies as on the emulator), every kernel timed on device data beside cuBLAS, forward latency at
# 1x16 and 32x128, the 4-layer train step at 32x128 on the GPU and on 2 CPU threads, and a
# 200-step heal on the GPU whose first 20 losses are compared with the CPU's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pack=.gpu

prepare() {
    scripts/fetch_model.sh
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf "$pack" && mkdir -p "$pack/bin"
    cargo build --release --bin scalpel
    cp target/release/scalpel "$pack/bin/"
    # The device test binaries, built as the tests build them.
    for t in "-p scalpel-autograd --test autograd_tests" "-p scalpel --test scalpel_tests"; do
        # shellcheck disable=SC2086
        exe=$(cargo test --profile opt-test $t --no-run --message-format=json 2>/dev/null |
            python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])' | tail -1)
        cp "$exe" "$pack/bin/$(basename "${exe%-*}")"
    done
    # Compressed, so that binaries and model fit the device tool's 64 MiB.
    gzip -9 "$pack"/bin/*
    python3 - "$pack/model" <<'PY'
import json, pathlib, shutil, struct, sys
src, dst = pathlib.Path("models/all-MiniLM-L6-v2"), pathlib.Path(sys.argv[1])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "onnx", "openvino", "*.bin", "*.h5", "*.ot", "*.msgpack"))
raw = (src / "model.safetensors").read_bytes()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n]); data = raw[8 + n:]
out, blobs, offset = {}, [], 0
import array
for name, info in header.items():
    if name == "__metadata__":
        out[name] = info; continue
    begin, end = info["data_offsets"]; chunk = data[begin:end]
    if info["dtype"] == "F32":
        values = array.array("f"); values.frombytes(chunk)
        # f32 -> f16 (round to nearest even), through struct's 'e' format
        chunk = b"".join(struct.pack("<e", v) for v in values)
        info = dict(info, dtype="F16")
    out[name] = dict(info, data_offsets=[offset, offset + len(chunk)])
    blobs.append(chunk); offset += len(chunk)
h = json.dumps(out).encode(); h += b" " * (-len(h) % 8)
(dst / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY
    du -sh "$pack"
}

run() {
    [ -f "$pack/bin/scalpel.gz" ] || [ -x "$pack/bin/scalpel" ] || { echo "no $pack/bin/scalpel: run 'scripts/gpu_check.sh prepare' first and carry .gpu" >&2; exit 2; }
    for f in "$pack"/bin/*.gz; do [ -e "$f" ] && gunzip -f "$f"; done
    chmod +x "$pack"/bin/*
    out=${OUT:-/tmp/gpu_check}; mkdir -p "$out"
    # NVRTC and CUDA headers from the machine's toolkit or its Python CUDA wheels.
    site=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
    for d in /usr/local/cuda/lib64 "$site"/nvidia/cu13/lib "$site"/nvidia/cuda_nvrtc/lib; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    inc=""
    for d in /usr/local/cuda/include "$site"/nvidia/cu13/include "$site"/nvidia/cuda_runtime/include "$site"/nvidia/cuda_nvcc/include; do
        [ -d "$d" ] && inc="$inc${inc:+:}$d"
    done
    export SCALPEL_CUDA_INCLUDE="$inc" SCALPEL_EXPECT_GPU=1 SCALPEL_MODEL_DIR="$root/$pack/model"
    # The test binaries look for fixtures and the CLI where they were built.
    [ -e /work/main ] || { mkdir -p /work && ln -s "$root" /work/main; }
    mkdir -p /work/main/target/opt-test /work/main/target/tmp
    cp "$pack/bin/scalpel" /work/main/target/opt-test/scalpel
    bin="$pack/bin/scalpel"
    model="$pack/model"
    tests_ok=true
    "$pack/bin/autograd_tests" device 2>&1 | tee "$out/autograd_tests.log" | tail -3 || tests_ok=false
    "$pack/bin/scalpel_tests" device 2>&1 | tee "$out/scalpel_tests.log" | tail -3 || tests_ok=false
    "$bin" --device cuda bench kernels --json > "$out/kernels.json"
    fwd() { "$bin" --device "$1" bench forward --model "$model" --batch "$2" --seq "$3" --runs 50 --json; }
    trn() { "$bin" --device "$1" ${4:+--threads $4} bench train --model "$model" --drop 4,5 --batch 32 --seq 128 --runs "$2" --warmup "$3" --json; }
    fwd cuda 1 16 > "$out/forward_1x16.json"
    fwd cuda 32 128 > "$out/forward_32x128.json"
    trn cuda 20 3 > "$out/train_gpu.json"
    trn cpu 3 1 2 > "$out/train_cpu2.json"
    # 200 healing steps on the GPU against 20 on the CPU: the same data, seed and order.
    "$bin" cut --model "$model" --output "$out/cut4" --drop 4,5 --force > /dev/null
    cp tests/fixtures/minilm/sentences.txt "$out/heal.txt"
    heal() { "$bin" --device "$1" heal --student "$out/cut4" --teacher "$model" --data "$out/heal.txt" \
        --output "$out/healed_$1" --steps "$2" --batch-size 32 --lr 1e-4 --seed 0 --log "$out/heal_$1.jsonl" --force > /dev/null; }
    heal cuda 200
    heal cpu 20
    python3 - "$out" "$tests_ok" <<'PY'
import json, pathlib, sys
out, tests_ok = pathlib.Path(sys.argv[1]), sys.argv[2] == "true"
load = lambda n: json.loads((out / n).read_text())
lines = lambda n: [json.loads(l) for l in (out / n).read_text().splitlines()]
gpu, cpu = lines("heal_cuda.jsonl"), lines("heal_cpu.jsonl")
worst = max(abs(g["loss"] - c["loss"]) / abs(c["loss"]) for g, c in zip(gpu, cpu))
train_gpu, train_cpu = load("train_gpu.json"), load("train_cpu2.json")
table = {
    "tests_passed": tests_ok,
    "kernels": load("kernels.json"),
    "forward_1x16_ms": load("forward_1x16.json")["median_s"] * 1e3,
    "forward_32x128_ms": load("forward_32x128.json")["median_s"] * 1e3,
    "train_step_32x128_gpu_ms": train_gpu["median_s"] * 1e3,
    "train_step_32x128_cpu2_ms": train_cpu["median_s"] * 1e3,
    "train_speedup_vs_2_cpu_threads": train_cpu["median_s"] / train_gpu["median_s"],
    "heal_steps_gpu": len(gpu),
    "heal_first20_max_rel_loss_diff": worst,
    "heal_per_step_device": gpu[-1].get("device"),
}
text = json.dumps(table, indent=1)
(out / "gpu_check.json").write_text(text)
print(text)
PY
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: scripts/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
