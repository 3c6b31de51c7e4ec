#!/usr/bin/env python3
"""scalpel against PyTorch and ONNX Runtime on the same CPU workloads.

Workloads (the ones `scalpel bench` runs, built identically here):
  * f32 GEMM C = A·B, 1024³, at 1 and 2 threads;
  * bf16 GEMM 1024³ at 1 and 2 threads: scalpel `bench gemm --dtype bf16` (B packed once as a
    bf16 weight, A rounded to bf16 on each run, f32 accumulation and output) against PyTorch's
    `matmul` of the f32 operands under `torch.autocast("cpu", dtype=torch.bfloat16)` (which casts
    both operands on each call and returns bf16);
  * all-MiniLM-L6-v2 inference (forward + mean pooling + L2 normalisation) at 2 threads for
    batch 1 × seq 16, 1 × seq 128 and 32 × seq 128;
  * the same inference in bf16 at 1 × 128 and 32 × 128: scalpel `bench forward --dtype bf16`
    (linear weights held in bf16, bf16 GEMMs with f32 accumulation) against PyTorch's forward
    under `torch.autocast("cpu", dtype=torch.bfloat16)`; ONNX Runtime's column stays f32;
  * one training step of the 4-layer cut (layers 4 and 5 removed) at batch 32 × seq 128,
    2 threads: forward, pooled embedding, MSE against a fixed target, backward, AdamW over all
    parameters (no decay on biases and LayerNorm), dropout 0; and the same step in mixed
    precision: scalpel `bench train --precision bf16` (the three GEMMs of every linear layer in
    bf16 with f32 accumulation over f32 master weights) against PyTorch with the forward under
    `torch.autocast("cpu", dtype=torch.bfloat16)` and the loss in f32;
  * peak RSS (VmHWM) of a fresh process that loads the model and runs inference at 32 × 128.

Token ids are `[CLS]`, then `1000 + (b·7919 + t·104729) mod 20000`, then `[SEP]`, mask all ones
(scalpel::bench::synthetic_batch). The frameworks take turns: every round runs each workload
once per framework (scalpel as a fresh `scalpel bench ... --json` process, PyTorch and ONNX
Runtime in persistent worker processes that sleep while the others run), so background load
hits all of them alike. Samples from all rounds are pooled and the medians compared.

Usage: run.sh (creates the venv) or `python compare.py --scalpel BIN --model DIR`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CLS_ID, SEP_ID = 101, 102
LR, WEIGHT_DECAY = 1e-5, 0.01


def synthetic_ids(batch, seq):
    rows = []
    for b in range(batch):
        row = []
        for t in range(seq):
            if t == 0:
                row.append(CLS_ID)
            elif t == seq - 1:
                row.append(SEP_ID)
            else:
                row.append(1000 + (b * 7919 + t * 104729) % 20000)
        rows.append(row)
    return rows


def synthetic_target(n):
    import math
    return [0.05 * math.sin(i) for i in range(n)]


def peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def time_runs(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


# ---------------------------------------------------------------------------------------------
# Workers: one process per framework, answering JSON requests on stdin.


class TorchWorker:
    def __init__(self, model_dir):
        import torch
        torch.set_num_interop_threads(1)
        self.torch = torch
        self.model_dir = model_dir
        self.infer_model = None
        self.train_state = None

    def _load(self, layers_dropped=()):
        from transformers import AutoModel
        model = AutoModel.from_pretrained(
            self.model_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if layers_dropped:
            keep = [l for i, l in enumerate(model.encoder.layer) if i not in layers_dropped]
            model.encoder.layer = self.torch.nn.ModuleList(keep)
            model.config.num_hidden_layers = len(keep)
        return model

    def _embed(self, model, ids, mask):
        torch = self.torch
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    def _inputs(self, batch, seq):
        torch = self.torch
        ids = torch.tensor(synthetic_ids(batch, seq), dtype=torch.long)
        return ids, torch.ones_like(ids)

    def run(self, req):
        torch = self.torch
        torch.set_num_threads(req["threads"])
        kind, warmup, runs = req["kind"], req["warmup"], req["runs"]
        if kind == "gemm":
            n = req["n"]
            g = torch.Generator().manual_seed(0)
            a = torch.rand(n, n, generator=g) * 2 - 1
            b = torch.rand(n, n, generator=g) * 2 - 1
            if req.get("dtype") == "bf16":
                def autocast_matmul():
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        torch.matmul(a, b)
                return time_runs(autocast_matmul, warmup, runs)
            c = torch.empty(n, n)
            return time_runs(lambda: torch.matmul(a, b, out=c), warmup, runs)
        if kind == "forward":
            if self.infer_model is None:
                self.infer_model = self._load().eval()
            ids, mask = self._inputs(req["batch"], req["seq"])
            model = self.infer_model

            def fwd():
                with torch.inference_mode():
                    self._embed(model, ids, mask)

            def autocast_fwd():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fwd()
            return time_runs(autocast_fwd if req.get("dtype") == "bf16" else fwd, warmup, runs)
        if kind == "train":
            key = (tuple(req["drop"]), req["batch"], req["seq"])
            if self.train_state is None or self.train_state[0] != key:
                model = self._load(set(req["drop"])).train()
                decay = [p for n, p in model.named_parameters()
                         if "bias" not in n and "LayerNorm" not in n]
                no_decay = [p for n, p in model.named_parameters()
                            if "bias" in n or "LayerNorm" in n]
                opt = torch.optim.AdamW(
                    [{"params": decay, "weight_decay": WEIGHT_DECAY},
                     {"params": no_decay, "weight_decay": 0.0}],
                    lr=LR, betas=(0.9, 0.999), eps=1e-8)
                hidden = model.config.hidden_size
                target = torch.tensor(synthetic_target(req["batch"] * hidden)).view(
                    req["batch"], hidden)
                self.train_state = (key, model, opt, target, self._inputs(req["batch"], req["seq"]))
            _, model, opt, target, (ids, mask) = self.train_state

            def step():
                opt.zero_grad(set_to_none=True)
                pred = self._embed(model, ids, mask)
                loss = torch.nn.functional.mse_loss(pred, target)
                loss.backward()
                opt.step()

            def autocast_step():
                # Mixed precision as PyTorch's AMP recipe has it: the forward (and so the
                # backward's GEMMs) under bf16 autocast, the loss in f32, f32 master weights.
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    pred = self._embed(model, ids, mask)
                loss = torch.nn.functional.mse_loss(pred.float(), target)
                loss.backward()
                opt.step()
            return time_runs(autocast_step if req.get("dtype") == "bf16" else step, warmup, runs)
        raise ValueError(kind)


class OrtWorker:
    def __init__(self, onnx_path):
        import numpy as np
        import onnxruntime as ort
        self.np, self.ort, self.onnx_path = np, ort, onnx_path
        self.sessions = {}

    def _session(self, name, threads, path_or_bytes):
        key = (name, threads)
        if key not in self.sessions:
            so = self.ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.sessions[key] = self.ort.InferenceSession(
                path_or_bytes, so, providers=["CPUExecutionProvider"])
        return self.sessions[key]

    def run(self, req):
        np = self.np
        threads, warmup, runs = req["threads"], req["warmup"], req["runs"]
        if req["kind"] == "gemm":
            n = req["n"]
            sess = self._session("gemm", threads, matmul_model_bytes())
            rng = np.random.default_rng(0)
            a = (rng.random((n, n), dtype=np.float32) * 2 - 1)
            b = (rng.random((n, n), dtype=np.float32) * 2 - 1)
            return time_runs(lambda: sess.run(None, {"A": a, "B": b}), warmup, runs)
        if req["kind"] == "forward":
            sess = self._session("minilm", threads, self.onnx_path)
            ids = np.array(synthetic_ids(req["batch"], req["seq"]), dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            return time_runs(lambda: sess.run(None, feed), warmup, runs)
        raise ValueError(req["kind"])


def matmul_model_bytes():
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["n", "k"]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, ["k", "m"])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, ["n", "m"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def worker_main(kind, model_dir, onnx_path):
    worker = TorchWorker(model_dir) if kind == "torch" else OrtWorker(onnx_path)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            out = {"samples_s": worker.run(req)}
        except Exception as e:  # reported to the driver, which prints it
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


def rss_main(kind, model_dir, onnx_path, batch, seq, threads):
    """A fresh process: load the model, run inference 3 times, report VmHWM."""
    ids = synthetic_ids(batch, seq)
    if kind == "torch":
        import torch
        torch.set_num_threads(threads)
        w = TorchWorker(model_dir)
        model = w._load().eval()
        t_ids = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            for _ in range(3):
                w._embed(model, t_ids, torch.ones_like(t_ids))
    else:
        import numpy as np
        w = OrtWorker(onnx_path)
        sess = w._session("minilm", threads, onnx_path)
        a = np.array(ids, dtype=np.int64)
        for _ in range(3):
            sess.run(None, {"input_ids": a, "attention_mask": np.ones_like(a)})
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


# ---------------------------------------------------------------------------------------------
# Export


def export_onnx(model_dir, path):
    """MiniLM with mean pooling and L2 normalisation as one ONNX graph (dynamic batch and seq)."""
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_dir)

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = Pooled().eval()
    ids = torch.tensor(synthetic_ids(2, 16), dtype=torch.long)
    args = (ids, torch.ones_like(ids))
    tmp = path + ".tmp"
    try:
        torch.onnx.export(
            model, args, tmp, input_names=["input_ids", "attention_mask"],
            output_names=["embedding"], opset_version=17, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                          "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}})
    except Exception as e:  # newer torch: only the dynamo exporter
        print(f"  TorchScript export failed ({type(e).__name__}: {e}); trying dynamo=True",
              flush=True)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
        torch.onnx.export(
            model, args, tmp, input_names=["input_ids", "attention_mask"],
            output_names=["embedding"], dynamo=True, external_data=False,
            dynamic_shapes={"input_ids": {0: batch, 1: seq},
                            "attention_mask": {0: batch, 1: seq}})
    os.replace(tmp, path)


def check_onnx(model_dir, onnx_path):
    """The exported graph must agree with PyTorch, or its timings mean nothing."""
    import numpy as np
    import onnxruntime as ort
    import torch
    w = TorchWorker(model_dir)
    model = w._load().eval()
    ids = synthetic_ids(3, 20)
    t_ids = torch.tensor(ids, dtype=torch.long)
    with torch.inference_mode():
        ref = w._embed(model, t_ids, torch.ones_like(t_ids)).numpy()
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    a = np.array(ids, dtype=np.int64)
    out = sess.run(None, {"input_ids": a, "attention_mask": np.ones_like(a)})[0]
    err = float(np.abs(out - ref).max())
    if err > 1e-4:
        raise SystemExit(f"ONNX export disagrees with PyTorch (max abs diff {err:.2e})")
    print(f"  ONNX export matches PyTorch (max abs diff {err:.1e})", flush=True)


# ---------------------------------------------------------------------------------------------
# Driver


class Worker:
    def __init__(self, kind, args):
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", kind,
             "--model", args.model, "--onnx", args.onnx],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if not ready:
            raise SystemExit(f"{kind} worker failed to start")

    def run(self, req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        if "error" in out:
            raise SystemExit(f"{self.kind} worker: {out['error']}")
        return out["samples_s"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def scalpel_cmd(args, w, runs, warmup):
    cmd = [args.scalpel, "bench", w["kind"], "--threads", str(w["threads"]), "--json",
           "--runs", str(runs), "--warmup", str(warmup)]
    if w["kind"] == "gemm":
        cmd += ["--n", str(w["n"]), "--dtype", w.get("dtype", "f32")]
    else:
        cmd += ["--model", args.model, "--batch", str(w["batch"]), "--seq", str(w["seq"])]
    if w["kind"] == "forward":
        cmd += ["--dtype", w.get("dtype", "f32")]
    if w["kind"] == "train":
        cmd += ["--precision", w.get("dtype", "f32")]
    if w.get("drop"):
        cmd += ["--drop", ",".join(map(str, w["drop"]))]
    return cmd


def run_scalpel(args, w, runs, warmup):
    out = subprocess.run(scalpel_cmd(args, w, runs, warmup), check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scalpel", default="target/release/scalpel")
    p.add_argument("--model", default="models/all-MiniLM-L6-v2")
    p.add_argument("--onnx", default="benches/compare/.venv/minilm-l6-pooled.onnx")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=7, help="timed runs per framework per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default="",
                   help="comma-separated workload kinds (gemm, forward, train, rss) or parts of "
                        "workload names (1x16) to run")
    p.add_argument("--json-out", default="", help="also write the results here")
    p.add_argument("--worker", choices=["torch", "ort"], help=argparse.SUPPRESS)
    p.add_argument("--rss", choices=["torch", "ort"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        return worker_main(args.worker, args.model, args.onnx)
    if args.rss:
        return rss_main(args.rss, args.model, args.onnx, 32, 128, 2)

    try:
        import onnxruntime  # noqa: F401
        have_ort = True
    except ImportError:
        have_ort = False
        print("onnxruntime is not installed: ONNX Runtime columns are skipped", flush=True)
    if have_ort and not os.path.exists(args.onnx):
        print(f"exporting {args.model} to {args.onnx} ...", flush=True)
        export_onnx(args.model, args.onnx)
        check_onnx(args.model, args.onnx)

    workloads = [
        {"name": "gemm 1024^3, 1 thread", "kind": "gemm", "n": 1024, "threads": 1, "ort": True},
        {"name": "gemm 1024^3, 2 threads", "kind": "gemm", "n": 1024, "threads": 2, "ort": True},
        {"name": "gemm bf16 1024^3, 1 thread", "kind": "gemm", "n": 1024, "threads": 1,
         "dtype": "bf16", "ort": False},
        {"name": "gemm bf16 1024^3, 2 threads", "kind": "gemm", "n": 1024, "threads": 2,
         "dtype": "bf16", "ort": False},
        {"name": "forward 1x16, 2 threads", "kind": "forward", "batch": 1, "seq": 16,
         "threads": 2, "ort": True},
        {"name": "forward 1x128, 2 threads", "kind": "forward", "batch": 1, "seq": 128,
         "threads": 2, "ort": True},
        {"name": "forward 32x128, 2 threads", "kind": "forward", "batch": 32, "seq": 128,
         "threads": 2, "ort": True},
        {"name": "forward bf16 1x128, 2 threads", "kind": "forward", "batch": 1, "seq": 128,
         "threads": 2, "dtype": "bf16", "ort": True},
        {"name": "forward bf16 32x128, 2 threads", "kind": "forward", "batch": 32, "seq": 128,
         "threads": 2, "dtype": "bf16", "ort": True},
        {"name": "train step L4 32x128, 2 threads", "kind": "train", "batch": 32, "seq": 128,
         "threads": 2, "drop": [4, 5], "ort": False},
        {"name": "train step bf16 L4 32x128, 2 threads", "kind": "train", "batch": 32,
         "seq": 128, "threads": 2, "drop": [4, 5], "dtype": "bf16", "ort": False},
    ]
    if args.only:
        keep = set(args.only.split(","))
        workloads = [w for w in workloads
                     if w["kind"] in keep or any(k in w["name"] for k in keep)]

    print(f"load average at start: {load_average()}", flush=True)
    workers = {"torch": Worker("torch", args)}
    if have_ort:
        workers["ort"] = Worker("ort", args)
    else:
        for w in workloads:
            w["ort"] = False
    samples = {(w["name"], fw): [] for w in workloads for fw in ("scalpel", "torch", "ort")}
    for r in range(args.rounds):
        for w in workloads:
            req = {k: v for k, v in w.items() if k not in ("name", "ort")}
            req.update(runs=args.runs, warmup=args.warmup)
            order = ["scalpel", "torch"] + (["ort"] if w["ort"] else [])
            order = order[r % len(order):] + order[:r % len(order)]  # rotate who goes first
            for fw in order:
                if fw == "scalpel":
                    got = run_scalpel(args, w, args.runs, args.warmup)["samples_s"]
                else:
                    got = workers[fw].run(req)
                samples[(w["name"], fw)].extend(got)
                time.sleep(0.3)  # let spinning pool threads go to sleep
            meds = {fw: statistics.median(samples[(w["name"], fw)]) * 1e3 for fw in order}
            print(f"  round {r + 1}/{args.rounds} {w['name']}: "
                  + ", ".join(f"{fw} {m:.2f} ms" for fw, m in meds.items())
                  + f"  (load {load_average()})", flush=True)
    for wk in workers.values():
        wk.close()

    # Peak RSS of a fresh process loading the model and running inference at 32 x 128.
    rss = {}
    if not args.only or "rss" in args.only:
        rss["scalpel"] = run_scalpel(
            args, {"kind": "forward", "batch": 32, "seq": 128, "threads": 2}, 3, 1)["peak_rss_mb"]
        for fw in ("torch", "ort") if have_ort else ("torch",):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--rss", fw, "--model", args.model,
                 "--onnx", args.onnx], check=True, capture_output=True, text=True).stdout
            rss[fw] = json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    rows, results = [], []
    for w in workloads:
        med = {fw: statistics.median(s) if s else None
               for (name, fw), s in samples.items() if name == w["name"]}
        n = {fw: len(s) for (name, fw), s in samples.items() if name == w["name"]}

        def cell(fw):
            m = med[fw]
            if m is None:
                return "-"
            if w["kind"] == "gemm":
                return f"{m * 1e3:.2f} ms ({2 * w['n'] ** 3 / m / 1e9:.1f} GF/s)"
            return f"{m * 1e3:.2f} ms"
        rows.append((w["name"], cell("scalpel"), cell("torch"), cell("ort"),
                     ratio(med["scalpel"], med["torch"]), ratio(med["scalpel"], med["ort"])))
        results.append({"workload": w["name"], "median_s": med, "samples": n})
    if rss:
        mb = lambda fw: f"{rss[fw]:.0f} MB" if fw in rss else "-"
        rows.append(("peak RSS, inference 32x128", mb("scalpel"), mb("torch"), mb("ort"),
                     ratio(rss["scalpel"], rss.get("torch")),
                     ratio(rss["scalpel"], rss.get("ort"))))
        results.append({"workload": "peak_rss_inference_32x128_mb", "values": rss})

    head = ("workload", "scalpel", "PyTorch", "ONNX Runtime", "scalpel/PyTorch", "scalpel/ORT")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(wd) for c, wd in zip(r, widths)) + " |"
    print()
    print(f"medians over {args.rounds} rounds x {args.runs} runs (after {args.warmup} warm-up "
          "per round); ratios are scalpel time / other time (GEMM: the inverse of the "
          "GFLOP/s ratio; RSS: MB / MB); below 1 means scalpel is faster / smaller")
    print(line(head))
    print("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    for r in rows:
        print(line(r))
    print(f"\nload average at end: {load_average()}")
    try:
        import torch
        import onnxruntime
        print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
              f"cpu: {os.cpu_count()} cores")
    except ImportError:
        pass
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"results": results, "load_average_end": load_average()}, f, indent=1)


if __name__ == "__main__":
    main()
