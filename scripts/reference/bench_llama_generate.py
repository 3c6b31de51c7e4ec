"""Generation speed at batch 1: `scalpel generate` against transformers' `generate` on the same
GGUF, prompt and token count, both greedy on the same number of threads, alternating runs in one
process (transformers' model is loaded once; each scalpel run is a fresh process and reports its
own generation time, loading excluded). Prints each run and the medians as JSON.

OMP_WAIT_POLICY is set to PASSIVE before torch loads unless already set: on a shared machine,
OpenMP's spinning workers were preempted mid-barrier and made transformers several times slower
(the same setting as benches/serve uses for the Python servers).

  /work/venvs/gguf/bin/python scripts/reference/bench_llama_generate.py \
      --scalpel target/release/scalpel [--threads 2 --tokens 64 --rounds 5 --dtypes f32,bf16]

Each round runs transformers once and scalpel once per `--dtypes` entry (its `generate --dtype`).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import pathlib

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_llama_fixtures import GGUF_DIR, GGUF_NAME  # noqa: E402
from make_llama_model_fixtures import GREEDY_MESSAGE  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scalpel", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", default="f32", help="scalpel's --dtype values, comma-separated")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME).eval()
    chat = [{"role": "user", "content": GREEDY_MESSAGE}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    gguf = str(GGUF_DIR / GGUF_NAME)
    dtypes = args.dtypes.split(",")
    runs = {"transformers": [], **{f"scalpel {d}": [] for d in dtypes}}
    for _ in range(args.rounds):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        elapsed = time.perf_counter() - start
        runs["transformers"].append((out.shape[1] - ids.shape[1]) / elapsed)
        for dtype in dtypes:
            cmd = [args.scalpel, "--device", "cpu", "--threads", str(args.threads), "generate", "--model", gguf,
                   "--prompt", GREEDY_MESSAGE, "--chat", "--max-tokens", str(args.tokens), "--dtype", dtype]
            stderr = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
            match = re.search(r"(\d+) tokens in [\d.]+ s: ([\d.]+) tokens/s", stderr)
            if not match or int(match.group(1)) != args.tokens:
                sys.exit(f"scalpel --dtype {dtype} generated something else: {stderr}")
            runs[f"scalpel {dtype}"].append(float(match.group(2)))
        print(json.dumps({k: round(v[-1], 2) for k, v in runs.items()}), flush=True)
    medians = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
                      "median_tokens_per_s": medians,
                      "ratio_to_transformers": {d: medians[f"scalpel {d}"] / medians["transformers"] for d in dtypes}}))


if __name__ == "__main__":
    main()
