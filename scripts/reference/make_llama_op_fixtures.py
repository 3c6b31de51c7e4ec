"""PyTorch float64 references for the decoder (Llama) ops: RMSNorm, RoPE, SwiGLU and causal
grouped-query attention, forward and gradients.

Writes tests/fixtures/llama/ops/{rmsnorm,rope,swiglu,causal_attention_prefill,
causal_attention_cached}.safetensors. Each file holds the inputs, a random upstream gradient
`dout`, the outputs, and the input gradients `torch.autograd.grad(out, inputs, dout)`.
transformers' own functions are used where they work in float64 (`apply_rotary_pos_emb`,
`repeat_kv`); RMSNorm is `LlamaRMSNorm`'s formula written out (the module casts to float32).

Run with the venv that has torch and transformers:
  /work/venvs/gguf/bin/python scripts/reference/make_llama_op_fixtures.py
"""

import pathlib

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "llama" / "ops"
SEED = 1234


def grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, grad_outputs=dout)


def save(name, tensors, **meta):
    meta = {k: str(v) for k, v in meta.items()}
    meta.update(torch=torch.__version__, transformers=transformers.__version__)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(OUT / f"{name}.safetensors"), metadata=meta)


def rmsnorm(g):
    # LlamaRMSNorm's formula written out: the module itself casts to float32 inside.
    rows, cols, eps = 6, 40, 1e-5
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.5 * torch.randn(cols, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    dout = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dx, dw = grads(y, [x, w], dout)
    save("rmsnorm", dict(x=x, w=w, dout=dout, y=y, dx=dx, dw=dw), eps=eps)


def rope_cos_sin(head_dim, theta, positions):
    """As LlamaRotaryEmbedding: inverse frequencies and angles in float32, then cos/sin (taken
    here in float64 of the float32 angle)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    angles = inv_freq[None, :] * positions.float()[:, None]
    emb = torch.cat((angles, angles), dim=-1).double()
    return emb.cos(), emb.sin()


def rope(g):
    batch, seq, heads, head_dim, theta, first = 2, 5, 3, 8, 1e5, 7
    positions = torch.arange(first, first + seq)
    x = torch.randn(batch, seq, heads * head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(head_dim, theta, positions)
    # apply_rotary_pos_emb wants [batch, heads, seq, head_dim].
    xh = x.view(batch, seq, heads, head_dim).transpose(1, 2)
    y, _ = apply_rotary_pos_emb(xh, xh, cos[None], sin[None])
    y = y.transpose(1, 2).reshape(batch, seq, heads * head_dim)
    dout = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (dx,) = grads(y, [x], dout)
    save(
        "rope",
        dict(x=x, positions=positions, dout=dout, y=y, dx=dx),
        head_dim=head_dim,
        theta=theta,
    )


def swiglu(g):
    gate = torch.cat(
        [torch.linspace(-12, 12, 97, dtype=torch.float64), 3 * torch.randn(63, generator=g, dtype=torch.float64)]
    ).reshape(4, 40)
    gate.requires_grad_(True)
    up = torch.randn(4, 40, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.silu(gate) * up
    dout = torch.randn(y.shape, generator=g, dtype=torch.float64)
    dgate, dup = grads(y, [gate, up], dout)
    save("swiglu", dict(gate=gate, up=up, dout=dout, y=y, dgate=dgate, dup=dup))


def causal_attention(g, name, batch, q_len, kv_len, heads, kv_heads, head_dim):
    q = torch.randn(batch, q_len, heads * head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_len, kv_heads * head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_len, kv_heads * head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    qh = q.view(batch, q_len, heads, head_dim).transpose(1, 2)
    kh = repeat_kv(k.view(batch, kv_len, kv_heads, head_dim).transpose(1, 2), heads // kv_heads)
    vh = repeat_kv(v.view(batch, kv_len, kv_heads, head_dim).transpose(1, 2), heads // kv_heads)
    scores = qh @ kh.transpose(-1, -2) / head_dim**0.5
    offset = kv_len - q_len
    # Query i is at position offset + i and sees keys 0..=offset + i.
    allowed = torch.arange(kv_len)[None, :] <= (offset + torch.arange(q_len))[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = (scores.softmax(dim=-1) @ vh).transpose(1, 2).reshape(batch, q_len, heads * head_dim)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dq, dk, dv = grads(out, [q, k, v], dout)
    save(
        name,
        dict(q=q, k=k, v=v, dout=dout, out=out, lse=lse, dq=dq, dk=dk, dv=dv),
        heads=heads,
        kv_heads=kv_heads,
    )


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)
    rmsnorm(g)
    rope(g)
    swiglu(g)
    # 70 query rows cross the kernel's 64-row query block; 3 query heads per key/value head.
    causal_attention(g, "causal_attention_prefill", 1, 70, 70, 6, 2, 8)
    # The last 3 positions of 9, two sequences, as a decoding step with a cache of 6 does.
    causal_attention(g, "causal_attention_cached", 2, 3, 9, 4, 2, 5)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
