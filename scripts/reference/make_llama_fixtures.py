"""Reference values for the GGUF / Llama loading tests, from transformers' own GGUF loader.

Writes small JSON files under tests/fixtures/llama/:
  tokens.json   -- test strings with the token ids of
                   `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, and, where they differ,
                   the ids of the same vocabulary with SmolLM2's own pre-tokenizer (see below);
  tensors.json  -- for a handful of tensors, as `AutoModelForCausalLM.from_pretrained(dir,
                   gguf_file=...)` holds them (dequantized, Q/K un-permuted): the shape, a few rows
                   and per-row sums / float64 norms;
  config.json   -- the config transformers derives from the file's metadata.

`--check-converted DIR` instead loads a folder written by `scalpel convert` with
`AutoModelForCausalLM.from_pretrained(DIR)`, reports missing/unexpected keys, and compares its
logits on a prompt with the GGUF-loaded model's (and the tokenizers of both on every test string).

Run with the venv that has torch, transformers and gguf, e.g.
  /work/venvs/gguf/bin/python scripts/reference/make_llama_fixtures.py
"""

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
GGUF_DIR = ROOT / "models" / "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT = ROOT.parent / "shared" / "data" / "text" / "wikitext-2" / "valid.txt"

HANDWRITTEN = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you?",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "many      spaces   between   words",
    "tabs\tand\t\ttabs",
    "new\nline",
    "blank\n\nlines\n\n\n",
    "\r\nwindows line ends\r\n",
    "mixed \t \n whitespace \n\t ",
    "2024",
    " 2024",
    "1234567890",
    "3.14159 and 2.71828",
    "x = 12 + 345 * 6789",
    "a  2",
    "version   10.2.3",
    "tel: +1 (555) 010-9999",
    "1,000,000 and 1 000 000",
    "00000000000000000000000000000000",
    "It's, we're, they've, I'm, you'll, he'd",
    "IT'S LOUD, DON'T SHOUT",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "fn main() {\n    println!(\"{}\", 42);\n}",
    "SELECT name, COUNT(*) FROM users WHERE age >= 21 GROUP BY name;",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "https://example.com/path?query=1&other=two#frag",
    "user@example.org",
    "#!/usr/bin/env bash\nset -euo pipefail\n",
    "    indented code\n        more indented",
    "café naïve résumé façade coöperate",
    "Ünïcödé ÀÉÎÕÜ ßẞ",
    "日本語のテキストです。",
    "中文文本，标点符号！",
    "한국어 텍스트",
    "Русский текст, ёжик.",
    "Ελληνικά κείμενα",
    "العربية نص",
    "עברית טקסט",
    "हिन्दी पाठ",
    "ไทย ข้อความ",
    "emoji 😀🎉👍🏽 and 🇫🇷 flags",
    "family 👨‍👩‍👧‍👦 zwj",
    "e\u0301 combining acute",
    "zero\u200bwidth\u200bspace",
    "non\u00a0breaking\u00a0space",
    "superscripts x² y³ and fractions ½ ¾",
    "Arabic-Indic digits ٠١٢٣٤٥٦٧٨٩",
    "full-width ＡＢＣ１２３",
    "math ∀x ∈ ℝ: x² ≥ 0 ⇒ √x² = |x|",
    "quotes “curly” ‘single’ «guillemets» „low“",
    "dashes – — ‒ and ellipsis …",
    "currency $5 €10 £20 ¥30 ₹40",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|>",
    "<|im_start",
    "<repo_name>scalpel<file_sep>src/main.rs",
    "<think>reasoning</think>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...,,,;;;:::",
    "@-@ @,@ @.@",
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier",
    "\\n escaped \\t backslashes \\\\",
    "end with newline\n",
    "\n",
    "\n\n\n\n",
    "      ",
]


def generated_strings():
    """Strings built from pieces, so combinations of digits, spaces and punctuation are covered."""
    pieces = ["a", "Z", "7", "42", " ", "  ", "\t", "\n", ".", "'s", "é", "中", "😀", "-", "_", "<|im_end|>"]
    rng = np.random.default_rng(18)
    return ["".join(rng.choice(pieces, size=rng.integers(1, 12))) for _ in range(40)]


def wikitext_strings(count=150, max_chars=400):
    """Every k-th non-blank line of the validation text, short enough to keep the fixture small."""
    lines = [l for l in WIKITEXT.read_text(encoding="utf-8").split("\n") if l.strip() and len(l) <= max_chars]
    step = max(1, len(lines) // count)
    return lines[::step][:count]


def smollm_pretokenized(backend):
    """The same vocabulary and merges with SmolLM2's own pre-tokenizer: every digit split off,
    then the GPT-2 byte-level split (llama.cpp's "smollm" pre-type does the same). transformers'
    GGUF loader has no entry for "smollm" and keeps the plain GPT-2 split."""
    from tokenizers import Tokenizer, pre_tokenizers

    faithful = Tokenizer.from_str(backend.to_str())
    faithful.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return faithful


def token_fixture(tokenizer):
    faithful = smollm_pretokenized(tokenizer.backend_tokenizer)
    records = []
    for text in HANDWRITTEN + generated_strings() + wikitext_strings():
        ids = tokenizer(text)["input_ids"]
        record = {"text": text, "ids": ids}
        smollm_ids = faithful.encode(text).ids
        if smollm_ids != ids:
            record["smollm_ids"] = smollm_ids
        records.append(record)
    return records


def shortest_f32(values):
    """Each f32 as the shortest decimal that reads back to it, keeping the fixture small."""
    return [float(str(np.float32(v))) for v in values]


def tensor_fixture(model):
    """Per tensor: the shape, the first columns of some rows (f32 values, compared exactly), the
    float64 sum of every row (every 64th of the embedding's 49152) and the float64 norm."""
    state = model.state_dict()
    picks = {
        "model.embed_tokens.weight": [0, 1, 2, 19556, 49151],
        "model.layers.0.self_attn.q_proj.weight": [0, 1, 31, 32, 33, 63, 64, 575],
        "model.layers.0.self_attn.k_proj.weight": [0, 1, 31, 32, 63, 64, 191],
        "model.layers.29.self_attn.k_proj.weight": [0, 33, 100, 191],
        "model.layers.0.self_attn.v_proj.weight": [0, 191],
        "model.layers.7.mlp.down_proj.weight": [0, 575],
        "model.layers.0.input_layernorm.weight": [],
        "model.norm.weight": [],
    }
    columns = 48
    fixture = {}
    for name, rows in picks.items():
        values = state[name].detach().to("cpu").numpy()
        wide = values.astype(np.float64)
        entry = {"shape": list(values.shape), "norm": float(np.sqrt((wide**2).sum()))}
        if values.ndim == 1:
            entry["values"] = shortest_f32(values)
        else:
            step = 64 if values.shape[0] > 4096 else 1
            entry["row_sum_step"] = step
            entry["row_sums"] = wide.sum(axis=1)[::step].tolist()
            entry["rows"] = {str(r): shortest_f32(values[r, :columns]) for r in rows}
        fixture[name] = entry
    fixture["__keys__"] = sorted(state.keys())
    return fixture


def load_gguf(with_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME) if with_model else None
    return tokenizer, model


PROMPT = "The capital of France is Paris. The capital of Germany is"


def check_converted(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, reference = load_gguf(with_model=True)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    print("loading info:", {k: v for k, v in info.items()})
    converted_tokenizer = AutoTokenizer.from_pretrained(folder)
    mismatches = [
        r["text"] for r in token_fixture(tokenizer)
        if converted_tokenizer(r["text"])["input_ids"] != r.get("smollm_ids", r["ids"])
    ]
    print(f"tokenizer.json of {folder}: {len(mismatches)} strings differ from the expected ids", mismatches[:5])
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        want = reference(ids).logits
        got = model(ids).logits
    diff = (want - got).abs().max().item()
    print(f"prompt {PROMPT!r}: {ids.shape[1]} tokens, logits max |converted - gguf| = {diff:.3e}")
    print("greedy next token:", tokenizer.decode(want[0, -1].argmax()), "/", tokenizer.decode(got[0, -1].argmax()))
    problems = info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"] or mismatches or diff > 1e-5
    return 1 if problems else 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "tests" / "fixtures" / "llama")
    parser.add_argument("--check-converted", type=pathlib.Path)
    args = parser.parse_args()
    if args.check_converted:
        sys.exit(check_converted(args.check_converted))
    import transformers

    tokenizer, model = load_gguf(with_model=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokens = token_fixture(tokenizer)
    (args.out / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    differing = sum("smollm_ids" in r for r in tokens)
    print(f"tokens.json: {len(tokens)} strings, {differing} where SmolLM2's pre-tokenizer differs from transformers'")
    (args.out / "tensors.json").write_text(json.dumps(tensor_fixture(model)) + "\n")
    config = model.config.to_dict()
    config["__transformers_version__"] = transformers.__version__
    (args.out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
