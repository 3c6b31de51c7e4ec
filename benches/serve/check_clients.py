"""Embeddings from a running `scalpel serve` through the `openai` client (float and base64) and
plain HTTP (`/embed`, `/v1/embeddings`), each against sentence-transformers in this process:
cosine >= 0.99999 for every sentence, or exit 1.

    python check_clients.py --url http://127.0.0.1:8080 --model DIR --sentences FILE [--n 64]
"""
import argparse
import json
import sys
import urllib.request

import numpy as np


def post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--sentences", required=True)
    p.add_argument("--n", type=int, default=64)
    a = p.parse_args()
    with open(a.sentences) as f:
        texts = [l.rstrip("\n") for l in f if l.strip()][: a.n]
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer
    want = SentenceTransformer(a.model, device="cpu").encode(texts, convert_to_numpy=True)
    client = OpenAI(base_url=a.url + "/v1", api_key="unused")
    got = {
        "openai client, float": [d.embedding for d in client.embeddings.create(
            input=texts, model="all-MiniLM-L6-v2", encoding_format="float").data],
        # The client asks for base64 by default and decodes it itself.
        "openai client, base64": [d.embedding for d in client.embeddings.create(
            input=texts, model="all-MiniLM-L6-v2").data],
        "HTTP /v1/embeddings, float": [d["embedding"] for d in post(
            a.url + "/v1/embeddings", {"input": texts, "model": "m"})["data"]],
        "HTTP /v1/embeddings, base64": [np.frombuffer(__import__("base64").b64decode(d["embedding"]), dtype="<f4")
                                        for d in post(a.url + "/v1/embeddings",
                                                      {"input": texts, "model": "m", "encoding_format": "base64"})["data"]],
        "HTTP /embed": post(a.url + "/embed", {"inputs": texts}),
    }
    ok = True
    for name, rows in got.items():
        rows = np.asarray(rows, dtype=np.float64)
        cos = (rows * want).sum(1) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(want, axis=1))
        ok &= bool(cos.min() >= 0.99999) and rows.shape == want.shape
        print(f"{name:<30} {rows.shape[0]} sentences, min cosine to sentence-transformers {cos.min():.7f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
