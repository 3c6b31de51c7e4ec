#!/usr/bin/env bash
# The main job end to end on the default model (all-MiniLM-L6-v2, 6 layers):
#   score every layer on calibration pairs -> cut 6 -> KEEP layers automatically -> heal by
#   distillation on STS 2012-2014 + SICK text -> evaluate on STS 2015 (never seen in healing)
#   -> a before/after table (layers, parameters, latency, STS Spearman, teacher cosine) and the
#   layer-score report.
# Outputs go to runs/pipeline/ (git-ignored). Knobs: KEEP (4), METRIC (angular), HEAL_MINUTES (5),
# THREADS (all cores), STS_DIR (../shared/data/sts). Angular distance is the default metric because
# its choice for 4 layers (drop 2,3) scored best on STS 2015 of the four metrics' choices
# (README, Results); the whole run takes 7-15 minutes on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=models/all-MiniLM-L6-v2
out=runs/pipeline
keep=${KEEP:-4}
metric=${METRIC:-angular}
minutes=${HEAL_MINUTES:-5}
sts=${STS_DIR:-../shared/data/sts}
threads=${THREADS:-$(nproc)}

scripts/fetch_model.sh "$model"
cargo build --release --quiet
scalpel="target/release/scalpel --threads $threads"
mkdir -p "$out"

# --data is repeated once per file.
heal_data=(); for f in "$sts"/semeval-201[234]/*.tsv "$sts"/sick2014/SICK_*.txt; do heal_data+=(--data "$f"); done
eval_data=("$sts"/semeval-2015/*.tsv)
calibration=(); for f in "$sts"/sick2014/SICK_trial.txt "$sts"/semeval-2014/*.tsv; do calibration+=(--data "$f"); done

echo "== score: which layers matter (report: $out/layer_scores.html)"
$scalpel score --model "$model" "${calibration[@]}" --samples 256 \
    --target-layers "$keep" --report "$out/layer_scores.html"

echo "== cut 6 -> $keep layers, chosen by $metric"
$scalpel cut --model "$model" --auto "$keep" --metric "$metric" "${calibration[@]}" \
    --samples 256 --output "$out/cut" --force > /dev/null
python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print("removed layers", s["removed"], "-", s["reason"])' "$out/cut/surgery.json"

echo "== heal: $minutes minutes of MSE distillation from the full model"
$scalpel heal --student "$out/cut" --teacher "$model" "${heal_data[@]}" --output "$out/healed" \
    --minutes "$minutes" --batch-size 32 --lr 1e-4 --warmup 10 --loss mse --force

echo "== evaluate on STS 2015"
row() { # name dir [--teacher DIR]
    $scalpel eval --model "$2" --sts "${eval_data[@]}" "${@:3}" --json > "$out/eval_$1.json"
    $scalpel inspect --model "$2" --json > "$out/inspect_$1.json"
    $scalpel bench forward --model "$2" --batch 1 --seq 32 --runs 20 --json > "$out/latency_$1.json"
}
row teacher "$model" # its cosine with itself is 1 by definition: not computed
row cut "$out/cut" --teacher "$model"
row healed "$out/healed" --teacher "$model"

python3 - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
load = lambda kind, name: json.load(open(f"{out}/{kind}_{name}.json"))
teacher = load("eval", "teacher")["mean_spearman"]
print(f"\n{'model':<10} {'layers':>6} {'params':>12} {'latency b1xs32':>15} {'STS15 Spearman':>15} {'% teacher':>10} {'teacher cos':>12}")
for name in ["teacher", "cut", "healed"]:
    e, i, l = load("eval", name), load("inspect", name), load("latency", name)
    print(f"{name:<10} {i['num_layers']:>6} {i['total_params']:>12,} {1000 * l['median_s']:>12.2f} ms "
          f"{e['mean_spearman']:>15.2f} {100 * e['mean_spearman'] / teacher:>9.1f}% {e['teacher_cosine'] or 1.0:>12.4f}")
print(f"\nlayer scores: {out}/layer_scores.html   healed model: {out}/healed")
EOF
