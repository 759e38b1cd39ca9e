"""Masks and score modifiers over the *true* token positions of cached sequences.

:func:`qkv.attention` aligns queries bottom-right: with ``Nq`` queries and ``Nk`` keys, query row
``i`` sits at position ``i + Nk - Nq`` and key column ``j`` at ``j``. That is exactly right when
every sequence in the batch has the same length and its keys lie in order. A cache breaks both:
sequences have different lengths (key column ``j`` may be padding for one sequence and a real token
for another) and a streaming cache keeps its keys in a ring buffer. :class:`PositionMask` carries
each query's and each key's real position per batch element and applies causality (and optionally
a sliding window with sink tokens) to those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import Mask, tile_kinds
from ..scores import ScoreMod, as_score_mod

_FAR = 1 << 62  # beyond any position; padding value for tile minima/maxima


class PositionMask(Mask):
    """Causal attention by per-batch positions.

    Args:
        q_positions: ``(B, Nq)`` int64, the position of each query row.
        k_positions: ``(B, Nk)`` int64, the position of each key column, ``-1`` for an empty slot.
        window: if given, a query at ``p`` sees only keys at ``p - window ..= p`` ...
        sinks: ... plus the keys at positions ``< sinks`` (StreamingLLM's attention sinks).

    Key ``j`` is visible from query ``i`` of batch element ``b`` iff
    ``0 <= kpos <= qpos`` (and, with a window, ``kpos >= qpos - window or kpos < sinks``), where
    ``qpos = q_positions[b, i]`` and ``kpos = k_positions[b, j]``.
    """

    def __init__(self, q_positions: Tensor, k_positions: Tensor, *, window: int | None = None, sinks: int = 0):
        if q_positions.dim() != 2 or k_positions.dim() != 2 or q_positions.shape[0] != k_positions.shape[0]:
            raise ValueError(f"PositionMask: q_positions (B, Nq) and k_positions (B, Nk) must share B, got "
                             f"{tuple(q_positions.shape)} and {tuple(k_positions.shape)}")
        self.q_positions, self.k_positions = q_positions.long(), k_positions.long()
        self.window, self.sinks = window, sinks
        self.offset = k_positions.shape[1] - q_positions.shape[1]  # core position of query row 0

    def bind(self, batch, heads, nq, nk, device):
        expected = (batch, nq, nk)
        got = (self.q_positions.shape[0], self.q_positions.shape[1], self.k_positions.shape[1])
        if got != expected:
            raise ValueError(f"PositionMask: built for (B, Nq, Nk) = {got}, used on {expected}")
        if self.q_positions.device != torch.device(device):
            raise ValueError(f"PositionMask: positions on {self.q_positions.device}, but q is on {device}")
        return self

    def lookup(self, b: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """True positions of the queries and keys at core positions ``q``, ``k`` of batch ``b``."""
        return self.q_positions[b, q - self.offset], self.k_positions[b, k]

    def allowed(self, b, h, q, k):
        qpos, kpos = self.lookup(b, q, k)
        ok = (kpos >= 0) & (kpos <= qpos)
        if self.window is not None:
            ok = ok & ((kpos >= qpos - self.window) | (kpos < self.sinks))
        return ok

    def block_kinds(self, grid, batch, heads):
        """Exact-or-conservative tile kinds from each tile's range of query and key positions:
        ``O(Nq + Nk)`` work, whatever order the keys are stored in."""
        qmin = _tile_reduce(self.q_positions, grid.block_q, _FAR, torch.amin)[:, :, None]
        qmax = _tile_reduce(self.q_positions, grid.block_q, -_FAR, torch.amax)[:, :, None]
        valid = self.k_positions >= 0
        kmin = _tile_reduce(self.k_positions.masked_fill(~valid, _FAR), grid.block_k, _FAR, torch.amin)[:, None]
        kmax = _tile_reduce(self.k_positions.masked_fill(~valid, -_FAR), grid.block_k, -_FAR, torch.amax)[:, None]
        any_empty_slot = _tile_reduce((~valid).long(), grid.block_k, 0, torch.amax)[:, None] > 0
        empty = (kmax < 0) | (kmin > qmax)
        full = ~any_empty_slot & (kmax <= qmin)
        if self.window is not None:
            empty = empty | ((kmin >= self.sinks) & (kmax < qmin - self.window))
            full = full & ((kmax < self.sinks) | (kmin >= qmax - self.window))
        return tile_kinds(empty, full)[:, None]  # (B, 1, nQB, nKB)

    def remap_score_mod(self, score_mod):
        """``score_mod`` (or None) evaluated at the true positions instead of the core's."""
        mod = as_score_mod(score_mod)
        if mod is None:
            return None

        def at_true_positions(score, b, h, q, k, *tensors):
            qpos, kpos = self.lookup(b, q, k)
            return mod.apply(tensors, score, b, h, qpos, kpos)

        return ScoreMod(at_true_positions, mod.tensors, name=f"{mod.name} at cached positions", check=mod.check,
                        work=mod.work + 2.0)

    def __repr__(self):
        extra = f", window={self.window}, sinks={self.sinks}" if self.window is not None else ""
        return f"PositionMask(B={self.q_positions.shape[0]}, Nq={self.q_positions.shape[1]}, " \
               f"Nk={self.k_positions.shape[1]}{extra})"


def _tile_reduce(x: Tensor, block: int, fill: int, reduce) -> Tensor:
    """Reduce ``(B, N)`` over consecutive blocks of ``block`` columns (the tail padded with ``fill``)."""
    n = x.shape[1]
    tiles = -(-n // block)
    padded = F.pad(x, (0, tiles * block - n), value=fill)
    return reduce(padded.view(x.shape[0], tiles, block), dim=-1)
