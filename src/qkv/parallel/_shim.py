"""TEMPORARY: explicit positions and merge_partials until the `core` helper lands them on main.

Delete this file once ``qkv.attention(..., q_offset=, k_offset=)`` and ``qkv.merge_partials``
exist; :mod:`qkv.parallel.pairs` then calls them directly.
"""

from __future__ import annotations

import torch

import qkv
from qkv.masks import Mask, TileGrid, merge_over_batch_and_heads
from qkv.problem import make_problem
from qkv.scores import ScoreMod, as_score_mod


class _Shifted(Mask):
    """``inner`` bound to the global square problem, evaluated at local rows/cols shifted by the
    pair's global offsets."""

    def __init__(self, inner, q_shift, k_shift):
        self.inner, self.q_shift, self.k_shift = inner, q_shift, k_shift

    def allowed(self, b, h, q, k):
        return self.inner.allowed(b, h, q + self.q_shift, k + self.k_shift)


def _shift(mask, score_mod, batch, heads, total, nq, nk, q_offset, k_offset, device):
    q_shift = q_offset - (nk - nq)
    bound_mask = mask  # tensors: already the block's own rows/cols
    if isinstance(mask, Mask):
        bound_mask = _Shifted(mask.bind(batch, heads, total, total, device), q_shift, k_offset)
    mod = as_score_mod(score_mod)
    shifted_mod = None
    if mod is not None:
        fn = mod.fn

        def shifted(score, b, h, q, k, *tensors):
            return fn(score, b, h, q + q_shift, k + k_offset, *tensors)

        shifted_mod = ScoreMod(shifted, mod.tensors, name=mod.name)
    return bound_mask, shifted_mod


def attention(q, k, v, mask=None, *, q_offset, k_offset, total, score_mod=None, scale=None, backend=None,
              return_lse=True):
    m, s = _shift(mask, score_mod, q.shape[0], q.shape[1], total, q.shape[2], k.shape[2], q_offset, k_offset,
                  q.device)
    return qkv.attention(q, k, v, m, score_mod=s, scale=scale, backend=backend, return_lse=return_lse)


def pair_is_empty(mask, batch, heads, total, q_offset, nq, k_offset, nk) -> bool:
    m, _ = _shift(mask, None, batch, heads, total, nq, nk, q_offset, k_offset, torch.device("cpu"))
    grid = TileGrid(nq, nk, nq, nk)
    kinds = merge_over_batch_and_heads(m.block_kinds(grid, batch, heads))
    return bool((kinds == 0).all())


def merge_partials(outs, lses):
    lse = torch.logsumexp(torch.stack(list(lses)), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = 0
    for o, l in zip(outs, lses):
        w = torch.where(torch.isfinite(l), torch.exp(l - safe), torch.zeros_like(l))
        out = out + o * w.unsqueeze(-1).to(o.dtype)
    return out, lse


_ = make_problem
