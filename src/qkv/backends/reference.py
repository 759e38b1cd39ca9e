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
from .. import scoring
from . import costs
from .capabilities import Capabilities, reasons


def hidden_entries(problem: Problem) -> Tensor | None:
    """Bool ``(B|1, Hq|1, Nq, Nk)``: True where the mask (a bool mask, or ``-inf`` in a float mask)
    hides the key from the query; None when nothing is hidden."""
    p = problem
    return scoring.hidden_entries(p, *p.positions.grid(p.batch, p.q_heads, p.index_device), bias=p.bias)


def scores(problem: Problem, hidden: Tensor | None = None, k: Tensor | None = None) -> Tensor:
    """Scaled, modified, biased and masked scores ``(B, Hq, Nq, Nk)`` in the compute dtype;
    entries ``hidden`` (default: :func:`hidden_entries`) are ``-inf``. ``k`` replaces the
    problem's keys (the sanitised ones of :func:`visible_keys_only`)."""
    p = problem
    dtype = p.compute_dtype
    if hidden is None:
        hidden = hidden_entries(p)
    q = p.q.to(dtype)
    k = (p.k if k is None else k).to(dtype).repeat_interleave(p.group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * p.scale
    return scoring.score_tile(p, s, *p.positions.grid(p.batch, p.q_heads, p.index_device), bias=p.bias, hide=hidden)


def visible_keys_only(problem: Problem, hidden: Tensor | None) -> tuple[Tensor, Tensor]:
    """``k, v`` with zeros at the keys that ``hidden`` hides from every query (of every head in
    the key's group): whatever those slots hold (NaN, inf, garbage) then reaches no output or
    gradient."""
    p = problem
    if hidden is None:
        return p.k, p.v
    seen = (~hidden).any(dim=-2)  # (B|1, Hq|1, Nk)
    if seen.shape[1] > 1:
        seen = seen.reshape(seen.shape[0], p.kv_heads, p.group, p.nk).any(dim=2)
    seen = seen.unsqueeze(-1)
    return torch.where(seen, p.k, 0), torch.where(seen, p.v, 0)


def softmax_with_lse(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim and its log-sum-exp. A row that is all ``-inf`` gets zero weights
    and ``lse = -inf`` (no NaN, in value or gradient); a row holding NaN or ``+inf`` gets NaN
    weights and ``lse = NaN`` (never a silent zero)."""
    row_max = s.amax(dim=-1, keepdim=True)
    finite = torch.isfinite(row_max)
    shift = torch.where(finite, row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(s - shift)
    total = e.sum(dim=-1, keepdim=True)
    empty = row_max == float("-inf")
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), torch.log(safe_total) + shift)
    lse = torch.where(finite | empty, lse, torch.full_like(lse, float("nan")))
    return e / safe_total, lse.squeeze(-1)


def attention_weights(problem: Problem, hidden: Tensor | None = None,
                      k: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Attention weights ``(B, Hq, Nq, Nk)`` (before dropout) and ``lse (B, Hq, Nq)``."""
    if hidden is None:
        hidden = hidden_entries(problem)
    if k is None:
        k = visible_keys_only(problem, hidden)[0]
    return softmax_with_lse(scores(problem, hidden, k))


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
    capabilities = Capabilities()  # everything

    def unsupported(self, problem: Problem) -> list[str]:
        return reasons(self.capabilities, problem)

    def estimate(self, problem: Problem) -> float:
        """The materialised ``(B, Hq, Nq, Nk)`` softmax: a fixed cost per score (more with a score
        modifier, per unit of its work)."""
        p = problem
        r = costs.rates(p)
        t = p.nq * p.nk * p.batch * p.q_heads * (r.reference_score + r.reference_score_per_dim * (p.head_dim + p.v_dim)
                                                 + r.mod_score_per_work * costs.score_mod_work(p))
        return costs.with_backward(p, t / costs.parallel(p) + r.reference_call, r.tiled_backward)

    def run(self, problem: Problem) -> tuple[Tensor, Tensor]:
        hidden = hidden_entries(problem)
        k, v = visible_keys_only(problem, hidden)
        weights, lse = attention_weights(problem, hidden, k)
        if problem.dropout_p > 0:
            weights = apply_dropout(weights, problem)
        v = v.to(problem.compute_dtype).repeat_interleave(problem.group, dim=1)
        out = torch.matmul(weights, v).to(problem.dtype)
        return out, lse
