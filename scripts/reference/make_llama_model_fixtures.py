"""References for the Llama model tests, from transformers' GGUF loader (float32, eager
attention, one thread):

  tests/fixtures/llama/logits.safetensors -- for each prompt, its token ids and the logits at its
      last two positions over a fixed slice of the vocabulary (`vocab_ids`: every 97th id plus
      the top 32 of each row), so the file stays small;
  tests/fixtures/llama/greedy.json -- a user message through
      `apply_chat_template(..., add_generation_prompt=True)` (text and ids) and the 64 ids of
      `model.generate(do_sample=False, max_new_tokens=64)` after it;
  tests/fixtures/llama/perplexity.json -- the sliding-window perplexity of the transformers
      perplexity guide (context 256, stride 128) over the first 12 lines of
      ../shared/data/text/wikitext-2/valid.txt, with the token ids it scored.

The wikitext ids come from the file's vocabulary with SmolLM2's own pre-tokenizer (digits split
off: see make_llama_fixtures.py), which is what scalpel's tokenizer does, so both sides score the
same tokens.

  /work/venvs/gguf/bin/python scripts/reference/make_llama_model_fixtures.py
"""

import json
import math
import pathlib
import sys

import torch
import transformers
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_llama_fixtures import GGUF_DIR, GGUF_NAME, WIKITEXT, smollm_pretokenized  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "llama"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
]
GREEDY_MESSAGE = "Write a short story about a robot who learns to paint."
PERPLEXITY_LINES = 12
CONTEXT, STRIDE = 256, 128


def logits_fixture(model, tokenizer):
    tensors = {}
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -2:]
        top = logits.topk(32, dim=-1).indices.flatten()
        vocab_ids = torch.unique(torch.cat([torch.arange(0, logits.shape[-1], 97), top]))
        tensors[f"prompt{i}.ids"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"prompt{i}.vocab_ids"] = vocab_ids.to(torch.int64)
        tensors[f"prompt{i}.logits"] = logits[:, vocab_ids].contiguous()
    meta = {"prompts": json.dumps(PROMPTS), "torch": torch.__version__, "transformers": transformers.__version__}
    save_file(tensors, str(OUT / "logits.safetensors"), metadata=meta)


def greedy_fixture(model, tokenizer):
    # An instruct model ends a bare prompt at once (its first greedy token is the end of turn),
    # so the greedy reference is the answer to a chat message: 64 tokens before any end.
    chat = [{"role": "user", "content": GREEDY_MESSAGE}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64)
    generated = out[0, len(ids):].tolist()
    assert len(generated) == 64 and tokenizer.eos_token_id not in generated, generated
    fixture = {
        "message": GREEDY_MESSAGE,
        "chat_text": text,
        "prompt_ids": ids,
        "generated_ids": generated,
        "text": tokenizer.decode(generated),
    }
    (OUT / "greedy.json").write_text(json.dumps(fixture, indent=1) + "\n")


def perplexity_fixture(model, tokenizer):
    lines = WIKITEXT.read_text(encoding="utf-8").split("\n")[:PERPLEXITY_LINES]
    text = "\n".join(lines) + "\n"
    ids = smollm_pretokenized(tokenizer.backend_tokenizer).encode(text, add_special_tokens=False).ids
    input_ids = torch.tensor([ids])
    # The transformers perplexity guide's loop.
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    windows = []
    for begin in range(0, seq_len, STRIDE):
        end = min(begin + CONTEXT, seq_len)
        trg_len = end - prev_end
        window = input_ids[:, begin:end]
        target = window.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=target).loss
        # The tokens the loss averaged: labels shift by one inside the model. (The guide
        # subtracts one per window, exact only for the first, whose label 0 is not -100.)
        scored = (target[:, 1:] != -100).sum().item()
        nll_sum += loss.double().item() * scored
        n_tokens += scored
        windows.append({"begin": begin, "end": end, "scored": scored, "mean_nll": loss.item()})
        prev_end = end
        if end == seq_len:
            break
    fixture = {
        "lines": PERPLEXITY_LINES,
        "context": CONTEXT,
        "stride": STRIDE,
        "ids": ids,
        "windows": windows,
        "tokens_scored": n_tokens,
        "mean_nll": nll_sum / n_tokens,
        "perplexity": math.exp(nll_sum / n_tokens),
    }
    (OUT / "perplexity.json").write_text(json.dumps(fixture) + "\n")


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, attn_implementation="eager").eval()
    logits_fixture(model, tokenizer)
    greedy_fixture(model, tokenizer)
    perplexity_fixture(model, tokenizer)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
