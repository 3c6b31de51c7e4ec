"""Checks a Llama folder written by `scalpel heal` or `scalpel cut --replace` against transformers.

Loads the folder with `AutoModelForCausalLM.from_pretrained` (which must report no missing or
unexpected keys) and its `tokenizer.json`, and computes the perplexity of a text in
non-overlapping windows of --context tokens, each window's first token unscored: what
`scalpel perplexity --context N --stride N` computes. With --expect (scalpel's value), exit
status 1 when the two differ by more than 1e-4 relative.

  target/opt-test/scalpel perplexity --model runs/decoder_heal_study/healed_24_greedy-ppl \
      --text runs/decoder_heal_study/heldout.txt --context 512 --stride 512
  /work/venvs/serve/bin/python scripts/reference/check_decoder_heal.py \
      runs/decoder_heal_study/healed_24_greedy-ppl --text runs/decoder_heal_study/heldout.txt \
      --expect 35.7810
"""

import argparse
import math
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--text", required=True)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--expect", type=float)
    a = p.parse_args()
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model, info = AutoModelForCausalLM.from_pretrained(
        a.folder, torch_dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys")}
    if bad:
        print(f"loading {a.folder}: {bad}")
        return 1
    ids = Tokenizer.from_file(f"{a.folder}/tokenizer.json").encode(open(a.text).read()).ids
    nll, scored = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), a.context):
            window = torch.tensor([ids[begin : begin + a.context]])
            if window.shape[1] < 2:
                break
            loss = model(window, labels=window).loss.item()
            nll += loss * (window.shape[1] - 1)
            scored += window.shape[1] - 1
    ppl = math.exp(nll / scored)
    print(f"{a.folder}: {model.config.num_hidden_layers} layers, no missing or unexpected keys; "
          f"perplexity {ppl:.4f} over {scored} tokens")
    if a.expect is not None:
        ratio = ppl / a.expect
        print(f"scalpel {a.expect:.4f}, ratio {ratio:.7f}")
        return 0 if abs(ratio - 1) <= 1e-4 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
