"""Independent ground truth for the tests.

``textbook_attention`` is the formula written out with per-element Python predicates for masks,
sharing no code with qkv's masks or backends; it checks the reference backend, which then serves
as the float64 oracle for everything else.
"""

from __future__ import annotations

import math

import torch


def dense_from_predicate(pred, batch, heads, nq, nk):
    """Bool ``(B, H, Nq, Nk)`` from ``pred(b, h, q_pos, k_pos)`` evaluated element by element."""
    out = torch.zeros(batch, heads, nq, nk, dtype=torch.bool)
    offset = nk - nq
    for b in range(batch):
        for h in range(heads):
            for i in range(nq):
                for j in range(nk):
                    out[b, h, i, j] = bool(pred(b, h, i + offset, j))
    return out


def textbook_attention(q, k, v, allowed=None, bias=None, scale=None):
    """softmax(q k^T * scale + bias, masked) v in float64, rows with nothing allowed -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return w @ v


def naive_in_dtype(q, k, v, allowed=None, bias=None, scale=None, score_mod=None, positions=None):
    """Plain PyTorch math entirely in the input dtype (the baseline for low-precision error)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if score_mod is not None:
        s = score_mod(s, *positions)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, dim=-1)
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    return w @ v
