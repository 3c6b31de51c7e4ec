#!/usr/bin/env python3
"""Check that model folders written by `scalpel cut` / `scalpel heal` load in the Python ecosystem
exactly as scalpel reads them (developer-run; needs torch, transformers, sentence-transformers,
e.g. the venv of scripts/reference/make_fixtures.sh).

For each DIR: transformers' AutoModel reports no missing, unexpected or mismatched keys;
sentence-transformers loads it; and its embeddings of examples/sentences.txt agree with
`scalpel embed` on the same folder (cosine >= 0.9999 for every sentence). Exits non-zero otherwise.

    python scripts/reference/check_checkpoint.py runs/pipeline/cut runs/pipeline/healed
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

REPO = Path(__file__).resolve().parents[2]
SENTENCES = REPO / "examples" / "sentences.txt"
SCALPEL = REPO / "target" / "release" / "scalpel"


def check(folder):
    _, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    texts = [l for l in SENTENCES.read_text(encoding="utf-8").splitlines() if l.strip()]
    theirs = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "embeddings.jsonl"
        subprocess.run([str(SCALPEL), "embed", "--model", str(folder), "--input", str(SENTENCES),
                        "--output", str(out)], check=True, capture_output=True)
        ours = torch.tensor([json.loads(l)["embedding"] for l in out.read_text().splitlines()])
    cos = F.cosine_similarity(ours, theirs.float()).min().item()
    ok = not problems and cos >= 0.9999
    print(f"{folder}: loading problems {problems or 'none'}; min cosine vs scalpel embed {cos:.6f} "
          f"over {len(texts)} sentences -> {'ok' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    results = [check(Path(d)) for d in sys.argv[1:]]
    sys.exit(0 if all(results) else 1)
