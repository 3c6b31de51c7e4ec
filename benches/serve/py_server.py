"""The embedding server a Python user would write: FastAPI + uvicorn, one TEI-style route.

    python py_server.py --backend st|ort --model DIR --threads T --port P [--onnx FILE]

`st`: sentence-transformers' `encode` (PyTorch). `ort`: ONNX Runtime on the graph that
benches/compare/compare.py exports (MiniLM + mean pooling + L2 normalisation), tokenized by the
checkpoint's tokenizer.json with sentence-transformers' max_seq_length. `POST /embed`
`{"inputs": str | [str]}` answers `[[float]]`; `GET /health` answers once the model is loaded.
Endpoints are plain `def`s, so FastAPI runs each request in its thread pool, as users write them.
"""
import argparse
import json
import os
import sys

from fastapi import FastAPI
from pydantic import BaseModel


class EmbedRequest(BaseModel):
    inputs: str | list[str]


def st_backend(model_dir, threads):
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(threads)
    model = SentenceTransformer(model_dir, device="cpu")

    def embed(texts):
        with torch.inference_mode():
            return model.encode(texts, batch_size=32, convert_to_numpy=True).tolist()
    return embed


def ort_backend(model_dir, threads, onnx_path):
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "compare"))
    import compare  # the export and its check against PyTorch live there
    if not os.path.exists(onnx_path):
        compare.export_onnx(model_dir, onnx_path)
        compare.check_onnx(model_dir, onnx_path)
    with open(os.path.join(model_dir, "sentence_bert_config.json")) as f:
        max_len = json.load(f)["max_seq_length"]
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

    def embed(texts):
        enc = tok.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0].tolist()
    return embed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["st", "ort"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--onnx", default="benches/compare/.venv/minilm-l6-pooled.onnx")
    args = p.parse_args()
    if args.backend == "st":
        embed = st_backend(args.model, args.threads)
    else:
        embed = ort_backend(args.model, args.threads, args.onnx)
    app = FastAPI()

    @app.post("/embed")
    def embed_route(req: EmbedRequest):
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        return embed(texts)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
