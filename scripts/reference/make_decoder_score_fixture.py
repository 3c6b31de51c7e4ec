"""Reference layer scores of SmolLM2 (transformers on the GGUF, float32) for tests/decoder_cut.rs.

Two windows of 16 tokens from the start of wikitext-2's validation text (the ids are stored, so
the test feeds exactly these). Per layer l: block influence 1 - cos(x_l, x_{l+1}) over every
token, the angular distance arccos(cos(x_l, x_{l+1}))/pi over every token and over each window's
last token, where x_l is the residual stream entering layer l and x_L the last layer's output
before the final norm (captured with a hook: transformers' hidden_states[L] is after the norm);
and the calibration perplexity with each single layer deleted, beside the full model's.

  /work/venvs/gguf/bin/python scripts/reference/make_decoder_score_fixture.py
writes tests/fixtures/llama/decoder_scores.json.
"""

import json
import math

import torch
import torch.nn.functional as F

from make_llama_fixtures import ROOT, WIKITEXT, load_gguf

WINDOW, WINDOWS = 16, 2


def perplexity(model, windows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0]
            nll += F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    return math.exp(nll / count)


def main():
    torch.set_num_threads(2)
    tokenizer, model = load_gguf(with_model=True)
    model.eval()
    text = WIKITEXT.read_text(encoding="utf-8")[:4000]
    ids = tokenizer(text)["input_ids"]
    windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]
    layers = model.model.layers
    n = len(layers)
    captured = {}
    layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("last", o[0] if isinstance(o, tuple) else o))
    sums = {"block_influence": [0.0] * n, "angular": [0.0] * n, "angular_last": [0.0] * n}
    tokens = 0
    with torch.no_grad():
        for w in windows:
            out = model(torch.tensor([w]), output_hidden_states=True, use_cache=False)
            states = [h[0].double() for h in out.hidden_states[:n]] + [captured["last"][0].double()]
            for l in range(n):
                c = F.cosine_similarity(states[l], states[l + 1], dim=-1).clamp(-1, 1)
                sums["block_influence"][l] += (1 - c).sum().item()
                sums["angular"][l] += (torch.arccos(c) / math.pi).sum().item()
                sums["angular_last"][l] += (torch.arccos(c[-1]) / math.pi).item()
            tokens += len(w)
    scores = {
        "block_influence": [s / tokens for s in sums["block_influence"]],
        "angular": [s / tokens for s in sums["angular"]],
        "angular_last": [s / len(windows) for s in sums["angular_last"]],
    }
    full = perplexity(model, windows)
    dropped = []
    for removed in range(n):
        model.model.layers = torch.nn.ModuleList([layers[i] for i in range(n) if i != removed])
        model.config.num_hidden_layers = n - 1
        dropped.append(perplexity(model, windows))
    model.model.layers, model.config.num_hidden_layers = layers, n
    out = {
        "windows": windows,
        "scores": scores,
        "perplexity": full,
        "perplexity_without_layer": dropped,
        "made_by": "scripts/reference/make_decoder_score_fixture.py (transformers on the GGUF, float32)",
    }
    path = ROOT / "tests" / "fixtures" / "llama" / "decoder_scores.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: perplexity {full:.3f}, without each layer {min(dropped):.3f}..{max(dropped):.1f}")


if __name__ == "__main__":
    main()
