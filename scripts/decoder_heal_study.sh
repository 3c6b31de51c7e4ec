#!/usr/bin/env bash
# Decoder layer removal on SmolLM2-135M-Instruct (30 layers): which layers each metric removes
# for 24 and 20 kept layers, held-out perplexity of the teacher, of every cut before healing, and
# of the automatic cut and the "drop the last layers except the final one" baseline after the same
# healing budget (and the LLM-Streamline replacement of the angular block).
#
#   scripts/decoder_heal_study.sh                  # 15-minute heals for 24 layers, 8 for 20 (about 75 min)
#   MINUTES_24=2 MINUTES_20=1 scripts/decoder_heal_study.sh   # a quick look
#
# Healing text: wikitext-2 valid.txt up to its last article; held-out text: that article (never
# seen by scoring, cutting or healing). Perplexity: windows of 512 tokens, stride 512. Scoring:
# 4 calibration windows of 128 tokens of the healing text. SLEB's greedy removal to 20 layers
# continues from its 24-layer cut (the same rounds a run from 30 makes). Prints a Markdown table
# and writes everything under runs/decoder_heal_study/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${SCALPEL_BIN:-target/opt-test/scalpel}"
teacher="${TEACHER:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
text="${TEXT:-../shared/data/text/wikitext-2/valid.txt}"
out="${OUT:-runs/decoder_heal_study}"
threads="${THREADS:-2}"
minutes_24="${MINUTES_24:-15}"
minutes_20="${MINUTES_20:-8}"
# Auto cut: greedy-ppl (SLEB) minimises the calibration perplexity itself, on the healing text.
auto_metric="${AUTO_METRIC:-greedy-ppl}"
score_flags=(--windows "${WINDOWS:-4}" --window-tokens "${WINDOW_TOKENS:-128}")
heal_flags=(--batch-size 8 --window-tokens 128 --lr "${LR:-2e-4}" --warmup 5 --clip 1.0
            --eval-context 512 --threads "$threads")
mkdir -p "$out"
[[ -x "$bin" ]] || cargo build --profile opt-test --bin scalpel

# The held-out slice starts at the last article heading (`= Title =`).
split=$(grep -n '^ = [^=].* = $' "$text" | tail -1 | cut -d: -f1)
head -n $((split - 1)) "$text" > "$out/heal.txt"
tail -n +"$split" "$text" > "$out/heldout.txt"

ppl() { # model -> held-out perplexity
    "$bin" --threads "$threads" perplexity --model "$1" --text "$out/heldout.txt" \
        --context 512 --stride 512 --json 2>/dev/null |
        python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["perplexity"])'
}

layers_of() { # score json, metric[, the surgery.json of the scored cut] -> the source
    # layers removed, comma-separated
    python3 - "$@" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
m = next(m for m in report["metrics"] if m["metric"] == sys.argv[2])
source = json.load(open(sys.argv[3]))["kept"] if len(sys.argv) > 3 else list(range(report["layers"]))
keep = {source[l] for l in m["keep"]}
print(",".join(str(l) for l in range(30) if l not in keep))
EOF
}

removed() { # k, metric -> the layers the metric removes to keep k
    local k=$1 metric=$2 json="$out/score_${1}_$2.json"
    if [[ $k == 24 ]]; then
        layers_of "$out/score_24.json" "$metric"
    elif [[ $metric == greedy-ppl ]]; then
        "$bin" --threads "$threads" score --model "$out/cut_24_greedy-ppl" --data "$out/heal.txt" \
            --metric greedy-ppl --target-layers "$k" "${score_flags[@]}" --json > "$json" 2> /dev/null
        layers_of "$json" greedy-ppl "$out/cut_24_greedy-ppl/surgery.json"
    else
        "$bin" --threads "$threads" score --model "$teacher" --data "$out/heal.txt" \
            --metric "$metric" --target-layers "$k" "${score_flags[@]}" --json > "$json" 2> /dev/null
        layers_of "$json" "$metric"
    fi
}

heal() { # student, output, minutes -> "before after steps"
    "$bin" --threads "$threads" heal --student "$1" --teacher "$teacher" --data "$out/heal.txt" \
        --eval "$out/heldout.txt" --output "$2" --minutes "$3" "${heal_flags[@]}" --force \
        --log "$2.log.jsonl" > "$2.out" 2> "$2.err"
    python3 - "$2.out" "$2.log.jsonl" <<'EOF'
import re, sys
line = next(l for l in open(sys.argv[1]) if l.startswith("held-out perplexity"))
before, after = re.findall(r"(\d+\.\d+) \(step", line)
steps = sum(1 for _ in open(sys.argv[2]))
print(f"{float(before):.3f} {float(after):.3f} {steps}")
EOF
}

teacher_ppl=$(ppl "$teacher")
rows=()
for k in 24 20; do
    minutes=$([[ $k == 24 ]] && echo "$minutes_24" || echo "$minutes_20")
    if [[ $k == 24 ]]; then
        "$bin" --threads "$threads" score --model "$teacher" --data "$out/heal.txt" --metric all \
            --target-layers "$k" "${score_flags[@]}" --json > "$out/score_24.json" 2> "$out/score_24.err"
    fi
    n=$((30 - k))
    baseline=$(seq -s, $((29 - n)) 28)
    for metric in block-influence angular angular-last drop-ppl greedy-ppl baseline replace; do
        case $metric in
            baseline) drop=$baseline ;;
            replace) drop="" ;;
            *) drop=$(removed "$k" "$metric") ;;
        esac
        cut="$out/cut_${k}_$metric"
        if [[ $metric == replace ]]; then
            "$bin" --threads "$threads" cut --model "$teacher" --output "$cut" --auto "$k" \
                --replace --data "$out/heal.txt" --windows 32 --window-tokens 128 \
                --replace-steps "${REPLACE_STEPS:-300}" --replace-lr 3e-4 --force > "$cut.out" 2> "$cut.err"
            drop="$(python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["removed"])))' "$cut/surgery.json") → 1 trained"
        else
            "$bin" cut --model "$teacher" --output "$cut" --drop "$drop" --force > /dev/null
        fi
        if [[ $metric == "$auto_metric" || $metric == baseline ]]; then
            read -r before after steps < <(heal "$cut" "$out/healed_${k}_$metric" "$minutes")
            rows+=("| $k | $metric | $drop | $before | **$after** ($steps steps, $minutes min) |")
        else
            rows+=("| $k | $metric | $drop | $(ppl "$cut") | |")
        fi
        echo "${rows[-1]}" >&2
    done
done

echo "held-out perplexity, teacher (30 layers): $teacher_ppl"
echo
echo "| layers | metric | removed | cut | healed |"
echo "| --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
