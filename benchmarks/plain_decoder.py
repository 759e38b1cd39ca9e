"""A plain-PyTorch twin of ``qkv.nn.Decoder``'s default architecture, the peer of the decode benchmark.

What someone would write by hand for a small LLaMA-style model (nanoGPT-style): RMSNorm, RoPE from a
precomputed cos/sin table, ``F.scaled_dot_product_attention``, SwiGLU, tied embeddings, and a KV
cache that is a list of ``(k, v)`` tensors grown with ``torch.cat`` each step. It loads the weights
of a ``qkv.nn.Decoder`` (``from_qkv``), so both compute the same function and greedy decoding gives
the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm = nn.RMSNorm(dim, eps=eps)
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim, eps=eps)
        self.gate = nn.Linear(dim, mlp_dim, bias=False)
        self.up = nn.Linear(dim, mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None):
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        extra = {"enable_gqa": True} if self.kv_heads != self.heads else {}
        y = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and n > 1, **extra)
        x = x + self.o(y.transpose(1, 2).reshape(b, n, -1))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), (k, v)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class PlainDecoder(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, mlp_dim: int,
                 eps: float = 1e-5, base: float = 10000.0, max_positions: int = 4096):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(PlainBlock(dim, heads, kv_heads, mlp_dim, eps) for _ in range(layers))
        self.norm = nn.RMSNorm(dim, eps=eps)
        head_dim = dim // heads
        inv = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    @classmethod
    def from_qkv(cls, model) -> PlainDecoder:
        c, attn = model.config, model.blocks[0].attn
        mlp_dim = model.blocks[0].mlp.gate.out_features
        twin = cls(c.vocab_size, c.dim, c.num_layers, c.num_heads, attn.num_kv_heads, mlp_dim, c.norm_eps,
                   c.rope_base)
        with torch.no_grad():
            twin.embed.weight.copy_(model.token_embedding.weight)
            twin.norm.weight.copy_(model.norm.weight)
            for mine, theirs in zip(twin.blocks, model.blocks):
                for a, b in ((mine.q, theirs.attn.q_proj), (mine.k, theirs.attn.k_proj), (mine.v, theirs.attn.v_proj),
                             (mine.o, theirs.attn.out_proj), (mine.gate, theirs.mlp.gate), (mine.up, theirs.mlp.up),
                             (mine.down, theirs.mlp.down), (mine.attn_norm, theirs.attn_norm),
                             (mine.mlp_norm, theirs.mlp_norm)):
                    a.weight.copy_(b.weight)
        return twin.to(model.token_embedding.weight.dtype).eval()

    def forward(self, ids: Tensor, past: list | None, start: int):
        n = ids.shape[1]
        cos, sin = self.cos[start:start + n], self.sin[start:start + n]
        x = self.embed(ids)
        new_past = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, None if past is None else past[i])
            new_past.append(kv)
        return F.linear(self.norm(x), self.embed.weight), new_past

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy: prefill, then one token per step from the concatenating cache."""
        logits, past = self(ids, None, 0)
        pos = ids.shape[1]
        out = []
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            if step == max_new_tokens - 1:
                break
            logits, past = self(token, past, pos)
            pos += 1
        return torch.cat(out, dim=1)
