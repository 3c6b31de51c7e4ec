"""Checks a folder written by `scalpel cut --model SmolLM2.gguf --keep ...` against transformers.

Loads the GGUF with transformers' own loader, deletes every decoder layer not in --keep (the
reference cut, done in PyTorch), and compares its logits on a prompt with
`AutoModelForCausalLM.from_pretrained(FOLDER)` (which must report no missing or unexpected keys).
Exit status 1 on any difference above 1e-5.

  target/release/scalpel cut --model models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --output /tmp/smollm2-cut --keep 0-11,20-29
  /work/venvs/gguf/bin/python scripts/reference/check_decoder_cut.py /tmp/smollm2-cut --keep 0-11,20-29
"""

import argparse
import sys

from make_llama_fixtures import PROMPT, load_gguf


def layer_list(text):
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--keep", required=True, type=layer_list)
    a = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, reference = load_gguf(with_model=True)
    layers = reference.model.layers
    reference.model.layers = torch.nn.ModuleList([layers[i] for i in a.keep])
    for new, layer in enumerate(reference.model.layers):
        layer.self_attn.layer_idx = new
    reference.config.num_hidden_layers = len(a.keep)
    cut, info = AutoModelForCausalLM.from_pretrained(a.folder, output_loading_info=True)
    print("loading info:", dict(info))
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        want = reference(ids).logits
        got = cut(ids).logits
    diff = (want - got).abs().max().item()
    print(f"{len(a.keep)} layers kept; prompt of {ids.shape[1]} tokens: "
          f"logits max |scalpel cut - PyTorch cut| = {diff:.3e} (logit scale {want.abs().max().item():.1f})")
    problems = info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or diff > 1e-5
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
