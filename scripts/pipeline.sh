#!/usr/bin/env bash
# The main job end to end on the default model: fetch all-MiniLM-L6-v2, inspect it, embed a handful
# of sentences, cut it from 6 to 4 layers, heal the cut model by distillation on STS text, and
# compare the similarity matrices before and after. Outputs go to runs/ (git-ignored).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=models/all-MiniLM-L6-v2
out=runs/pipeline
steps=${STEPS:-60}
sts=${STS_DIR:-../shared/data/sts}

scripts/fetch_model.sh "$model"
cargo build --release --quiet
scalpel=target/release/scalpel
mkdir -p "$out"

echo "== inspect"
$scalpel inspect --model "$model"
echo "== similarity, full model"
$scalpel similarity --model "$model" --input examples/sentences.txt

echo "== cut 6 -> 4 layers (drop 4,5)"
$scalpel cut --model "$model" --drop 4,5 --output "$out/cut" --force

# Healing text: both sentences of every STS 2012 pair, one per line.
cut -f2,3 "$sts"/semeval-2012/*.tsv | tr '\t' '\n' | awk 'NF' > "$out/heal.txt"
echo "== heal: $steps AdamW steps distilling the full model's embeddings into the cut one"
$scalpel heal --student "$out/cut" --teacher "$model" --data "$out/heal.txt" --output "$out/healed" \
    --steps "$steps" --batch-size 32 --lr 1e-4 --loss mse --force --log "$out/heal_log.jsonl"

echo "== similarity, cut (before healing)"
$scalpel similarity --model "$out/cut" --input examples/sentences.txt
echo "== similarity, healed"
$scalpel similarity --model "$out/healed" --input examples/sentences.txt
