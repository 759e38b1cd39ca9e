"""The textbook formula, materialised: ``softmax(q k^T * scale + mods, masked) v``.

Any dtype (float64 included), any mask, score modifier, bias and dropout; autograd is PyTorch's.
It is the oracle the other backends are tested against and the source of attention maps. It
holds the whole ``(B, Hq, Nq, Nk)`` score matrix, so it is for small problems.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import dropout as _dropout
from ..problem import Problem
from . import costs


def scores(problem: Problem) -> Tensor:
    """Scaled, modified, biased and masked scores ``(B, Hq, Nq, Nk)`` in the compute dtype;
    disallowed entries are ``-inf``."""
    p = problem
    dtype = p.compute_dtype
    q = p.q.to(dtype)
    k = p.k.to(dtype).repeat_interleave(p.group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * p.scale
    b, h, qi, ki = p.positions.grid(p.batch, p.q_heads, p.index_device)
    if p.score_mod is not None:
        s = p.score_mod(s, b, h, qi, ki)
    if p.bias is not None:
        s = s + p.bias.to(dtype)
    if p.mask is not None:
        s = s.masked_fill(~p.mask.allowed(b, h, qi, ki), float("-inf"))
    return s


def softmax_with_lse(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its log-sum-exp. A row that is all ``-inf`` gets zero weights
    and ``lse = -inf`` (no NaN, in value or gradient)."""
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(s - row_max)
    total = e.sum(dim=-1, keepdim=True)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, torch.log(safe_total) + row_max, torch.full_like(total, float("-inf")))
    return e / safe_total, lse.squeeze(-1)


def attention_weights(problem: Problem) -> tuple[Tensor, Tensor]:
    """Attention weights ``(B, Hq, Nq, Nk)`` (before dropout) and ``lse (B, Hq, Nq)``."""
    return softmax_with_lse(scores(problem))


def apply_dropout(weights: Tensor, problem: Problem) -> Tensor:
    p = problem
    b = torch.arange(p.batch, device=p.index_device).view(-1, 1, 1, 1)
    h = torch.arange(p.q_heads, device=p.index_device).view(1, -1, 1, 1)
    rows = torch.arange(p.nq, device=p.index_device).view(1, 1, -1, 1)
    cols = torch.arange(p.nk, device=p.index_device).view(1, 1, 1, -1)
    keep = _dropout.keep_mask(p.seed, p.dropout_p, b, h, p.q_heads, rows, cols)
    return weights * keep / (1.0 - p.dropout_p)


class ReferenceBackend:
    name = "reference"

    def unsupported(self, problem: Problem) -> list[str]:
        return []

    def estimate(self, problem: Problem) -> float:
        return costs.reference(problem)

    def run(self, problem: Problem) -> tuple[Tensor, Tensor]:
        weights, lse = attention_weights(problem)
        if problem.dropout_p > 0:
            weights = apply_dropout(weights, problem)
        v = problem.v.to(problem.compute_dtype).repeat_interleave(problem.group, dim=1)
        out = torch.matmul(weights, v).to(problem.dtype)
        return out, lse
