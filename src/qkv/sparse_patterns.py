"""The named sparse-attention families as ordinary qkv masks.

Each pattern is a :class:`qkv.Mask`: ``allowed(b, h, q, k)`` over positions (so every exact
backend runs it and the reference can materialise it), and an analytic, exact
:meth:`~qkv.Mask.block_kinds` computed from the tile grid's position bounds in ``O(tiles)``
(so the tiled backend skips empty tiles and the cost follows the pattern's density).

==========================  =====================================================================
``longformer(w, globals)``  sliding window of ``w // 2`` keys each side, plus global tokens that
                            see and are seen by every token (Beltagy et al. 2020)
``bigbird(block_size, ..)`` blocks: a window of blocks, global blocks, and ``random_blocks``
                            seeded random key blocks per query block (Zaheer et al. 2020)
``dilated_window(l, r, d)`` every ``d``-th key, ``l`` steps back and ``r`` ahead; ``d`` may differ
                            per head (Longformer's dilated sliding window)
``sparse_strided(l)``       the previous ``l`` keys and every ``l``-th key before them
                            (Sparse Transformer, Child et al. 2019)
``sparse_fixed(l, c)``      keys in the query's own block of ``l``, and the last ``c`` keys of
                            every block ("summary" columns; Sparse Transformer)
==========================  =====================================================================

Exactness of the block views rests on one fact: over a tile of consecutive query positions
``qf..ql`` and key positions ``kf..kl``, the difference ``q - k`` takes every integer value in
``qf - kl .. ql - kf``. Patterns that depend on ``q - k`` only (dilated, strided) are decided on
that interval; the others are decided on position counts (prefix sums, sorted position lists).
See ``docs/sparse.md`` for pictures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .masks import (BlockSparse, GlobalTokens, Mask, SlidingWindow, TileGrid, _broadcast_index, _int_vector,
                    tile_kinds)
from .positions import Positions
from .validate import positive_int


def _non_negative_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _bounds(grid: TileGrid) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tile bounds in positions: ``qf, ql (B|1, 1, nQB, 1)``, ``kf, kl (B|1, 1, 1, nKB)`` (per batch
    element when the offsets are), so that tests on them broadcast to ``(B|1, 1, nQB, nKB)``."""
    qf, ql = grid.query_bounds()
    kf, kl = grid.key_bounds()
    return qf, ql, kf, kl


def _has_multiple(lo: Tensor, hi: Tensor, step: Tensor | int) -> Tensor:
    """Whether the integer interval ``lo ..= hi`` holds a multiple of ``step`` (False if empty)."""
    return (lo <= hi) & (torch.div(hi, step, rounding_mode="floor") * step >= lo)


# --------------------------------------------------------------------------------------------
# Longformer
# --------------------------------------------------------------------------------------------


class Longformer(Mask):
    """Sliding window (``left`` keys before, ``right`` after) | global tokens (symmetric: a
    global token sees every key and every query sees it). ``global_indices`` are positions."""

    def __init__(self, left: int, right: int, global_indices=()):
        self.window = SlidingWindow(left, right)
        if not isinstance(global_indices, Tensor) and len(global_indices) == 0:
            global_indices = torch.zeros(0, dtype=torch.int64)  # an empty list would read as float
        self.globals = GlobalTokens(global_indices)
        runs = self._runs(self.globals.indices)
        self._run_first, self._run_last = runs

    @staticmethod
    def _runs(indices: Tensor) -> tuple[Tensor, Tensor]:
        """For each (sorted, unique) global position, the first and last position of the run of
        consecutive global positions it belongs to."""
        n = indices.numel()
        if n == 0:
            return indices, indices
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = indices[1:] != indices[:-1] + 1
        run_id = starts.cumsum(0) - 1
        ends = torch.ones(n, dtype=torch.bool)
        ends[:-1] = starts[1:]
        return indices[starts][run_id], indices[ends][run_id]

    def bind(self, batch, heads, nq, nk, device, positions: Positions | None = None):
        return self._bound_copy(globals=self.globals.bind(batch, heads, nq, nk, device, positions=positions),
                                _run_first=self._run_first.to(device), _run_last=self._run_last.to(device))

    def allowed(self, b, h, q, k):
        return self.window.allowed(b, h, q, k) | self.globals.allowed(b, h, q, k)

    def _ordinary(self, first: Tensor, last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Smallest and largest position in ``first ..= last`` that is not global, and whether
        there is one (``searchsorted`` over the sorted global positions and their runs)."""
        glob = self.globals.indices.to(first.device)
        if glob.numel() == 0:
            return first, last, first <= last
        n = glob.numel()
        i = torch.searchsorted(glob, first.contiguous()).clamp(max=n - 1)
        smallest = torch.where(glob[i] == first, self._run_last.to(first.device)[i] + 1, first)
        j = (torch.searchsorted(glob, last.contiguous(), right=True) - 1).clamp(min=0)
        largest = torch.where(glob[j] == last, self._run_first.to(first.device)[j] - 1, last)
        return smallest, largest, smallest <= last

    def block_kinds(self, grid, batch, heads):
        window = self.window.block_kinds(grid, batch, heads)
        globals_ = self.globals.block_kinds(grid, batch, heads)
        empty = (window == 0) & (globals_ == 0)
        qf, ql, kf, kl = _bounds(grid)
        q_min, q_max, q_some = self._ordinary(qf, ql)
        k_min, k_max, k_some = self._ordinary(kf, kl)
        # Full: every (ordinary query, ordinary key) pair of the tile lies in the window.
        in_window = (q_max - self.window.left <= k_min) & (k_max <= q_min + self.window.right)
        return tile_kinds(empty, ~q_some | ~k_some | in_window)

    def __repr__(self):
        return (f"longformer(left={self.window.left}, right={self.window.right}, "
                f"global_tokens={self.globals.indices.tolist()})")


# --------------------------------------------------------------------------------------------
# BigBird
# --------------------------------------------------------------------------------------------


class BigBird(Mask):
    """BigBird's block pattern over blocks of ``block_size`` positions: query block ``i`` sees
    key block ``j`` iff ``|i - j| <= window_blocks // 2``, or either is one of the first
    ``global_blocks`` blocks, or ``j`` is one of the ``random_blocks`` key blocks drawn for ``i``.

    The random blocks of each non-global query block are drawn without replacement from the key
    blocks it does not already see, by a generator seeded with ``seed``: the same seed and the same
    number of blocks give the same pattern. Bidirectional; combine with ``qkv.causal()`` for a
    decoder."""

    def __init__(self, block_size: int = 64, window_blocks: int = 3, global_blocks: int = 2,
                 random_blocks: int = 3, seed: int = 0):
        self.block_size = positive_int("bigbird: block_size", block_size)
        self.window_blocks = positive_int("bigbird: window_blocks", window_blocks)
        if window_blocks % 2 == 0:
            raise ValueError(f"bigbird: window_blocks must be odd (the query block and as many on each side), "
                             f"got {window_blocks}")
        self.global_blocks = _non_negative_int("bigbird: global_blocks", global_blocks)
        self.random_blocks = _non_negative_int("bigbird: random_blocks", random_blocks)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"bigbird: seed must be an int, got {type(seed).__name__}")
        self.seed = seed

    def layout(self, num_blocks: int) -> Tensor:
        """The ``(num_blocks, num_blocks)`` bool block layout (query block, key block), on CPU."""
        i = torch.arange(num_blocks)
        near = (i[:, None] - i[None, :]).abs() <= self.window_blocks // 2
        glob = (i[:, None] < self.global_blocks) | (i[None, :] < self.global_blocks)
        fixed = near | glob
        g = torch.Generator().manual_seed(self.seed)
        # A random key order per query block; blocks already seen sort last and are never picked.
        draw = torch.rand(num_blocks, num_blocks, generator=g, dtype=torch.float64).masked_fill(fixed, 2.0)
        take = min(self.random_blocks, num_blocks)
        picked = torch.zeros_like(fixed)
        if take:
            order = draw.topk(take, dim=1, largest=False)
            picked.scatter_(1, order.indices, order.values < 2.0)
        return fixed | picked

    def bind(self, batch, heads, nq, nk, device, positions: Positions | None = None):
        """The layout covers key positions ``0 .. Nk-1`` by default; with explicit offsets, every
        position up to the highest query or key position of the call."""
        top = nk - 1
        if positions is not None and positions.explicit:
            top = max(positions.query_span()[1], positions.key_span()[1])
        num_blocks = max(1, math.ceil((top + 1) / self.block_size))
        blocks = BlockSparse(self.layout(num_blocks), self.block_size).bind(batch, heads, nq, nk, device,
                                                                             positions=positions)
        return self._bound_copy(_blocks=blocks)

    def allowed(self, b, h, q, k):
        return self._blocks.allowed(b, h, q, k)

    def block_kinds(self, grid, batch, heads):
        return self._blocks.block_kinds(grid, batch, heads)

    def __repr__(self):
        return (f"bigbird(block_size={self.block_size}, window_blocks={self.window_blocks}, "
                f"global_blocks={self.global_blocks}, random_blocks={self.random_blocks}, seed={self.seed})")


# --------------------------------------------------------------------------------------------
# Dilated sliding window
# --------------------------------------------------------------------------------------------


class DilatedWindow(Mask):
    """Key ``k`` is visible from query ``q`` iff ``q - k = j * d`` for an integer
    ``-right <= j <= left``: every ``d``-th key, ``left`` steps back and ``right`` ahead.
    ``dilation`` is an int or one per query head."""

    def __init__(self, left: int, right: int = 0, dilation=1):
        self.left = _non_negative_int("dilated_window: left", left)
        self.right = _non_negative_int("dilated_window: right", right)
        if isinstance(dilation, int) and not isinstance(dilation, bool):
            dilation = [dilation]
        d = _int_vector("dilated_window: dilation", dilation)
        if d.numel() == 0 or int(d.min()) < 1:
            raise ValueError(f"dilated_window: dilation must be >= 1 (an int or one per head), got {d.tolist()}")
        self.dilation = d

    def bind(self, batch, heads, nq, nk, device, positions: Positions | None = None):
        if self.dilation.numel() not in (1, heads):
            raise ValueError(f"dilated_window: dilation has {self.dilation.numel()} entries, expected 1 "
                             f"or heads={heads}")
        return self._bound_copy(dilation=self.dilation.to(device))

    def _per_head(self, h: Tensor) -> Tensor:
        return self.dilation[_broadcast_index(h, self.dilation.numel())]

    def allowed(self, b, h, q, k):
        d = self._per_head(h)
        diff = q - k
        return (diff >= -self.right * d) & (diff <= self.left * d) & (diff % d == 0)

    def block_kinds(self, grid, batch, heads):
        qf, ql, kf, kl = _bounds(grid)
        d = self.dilation.to(qf.device).view(1, -1, 1, 1)  # (1, H|1, 1, 1)
        lo, hi = qf - kl, ql - kf  # every integer in between is a q - k of the tile
        low, high = -self.right * d, self.left * d
        empty = ~_has_multiple(torch.maximum(lo, low), torch.minimum(hi, high), d)
        full = (lo >= low) & (hi <= high) & ((d == 1) | ((lo == hi) & (lo % d == 0)))
        return tile_kinds(empty, full)

    def __repr__(self):
        d = self.dilation.tolist()
        return f"dilated_window({self.left}, {self.right}, dilation={d[0] if len(d) == 1 else d})"


# --------------------------------------------------------------------------------------------
# Sparse Transformer
# --------------------------------------------------------------------------------------------


class SparseStrided(Mask):
    """Sparse Transformer's strided pattern (both factorised heads merged): query ``q`` sees key
    ``k`` iff ``0 <= q - k <= stride`` or ``q - k`` is a positive multiple of ``stride``. With
    ``causal=False`` the same holds for ``|q - k|``."""

    def __init__(self, stride: int, causal: bool = True):
        self.stride = positive_int("sparse_strided: stride", stride)
        self.causal = bool(causal)

    def allowed(self, b, h, q, k):
        diff = q - k
        near = diff.abs() <= self.stride
        ok = near | (diff % self.stride == 0)
        return ok & (diff >= 0) if self.causal else ok

    def block_kinds(self, grid, batch, heads):
        qf, ql, kf, kl = _bounds(grid)
        lo, hi = qf - kl, ql - kf
        s = self.stride
        if self.causal:  # allowed differences: 0 ..= s, then s, 2s, 3s, ...
            lo_c = lo.clamp(min=0)
            some = (lo_c <= hi) & ((lo_c <= s) | _has_multiple(lo_c, hi, s))
            full = (lo >= 0) & ((hi <= s) | ((lo == hi) & (lo % s == 0)) | (s == 1))
        else:  # allowed differences: -s ..= s, and every multiple of s
            some = ((lo <= s) & (hi >= -s)) | _has_multiple(lo, hi, s)
            full = ((lo >= -s) & (hi <= s)) | ((lo == hi) & (lo % s == 0)) | (s == 1)
        return tile_kinds(~some, full)

    def __repr__(self):
        return f"sparse_strided({self.stride}, causal={self.causal})"


class SparseFixed(Mask):
    """Sparse Transformer's fixed pattern (both factorised heads merged): query ``q`` sees key
    ``k`` iff they lie in the same block of ``stride`` positions (``q // stride == k // stride``) or
    ``k`` is one of the last ``summary`` positions of its block (``k % stride >= stride - summary``);
    with ``causal=True`` (default) also ``k <= q``."""

    def __init__(self, stride: int, summary: int = 1, causal: bool = True):
        self.stride = positive_int("sparse_fixed: stride", stride)
        self.summary = positive_int("sparse_fixed: summary", summary)
        if summary > stride:
            raise ValueError(f"sparse_fixed: summary ({summary}) must be at most stride ({stride})")
        self.causal = bool(causal)

    def allowed(self, b, h, q, k):
        s = self.stride
        ok = (torch.div(q, s, rounding_mode="floor") == torch.div(k, s, rounding_mode="floor")) | (
            k % s >= s - self.summary)
        return ok & (k <= q) if self.causal else ok

    def _summaries_upto(self, x: Tensor) -> Tensor:
        """How many summary positions lie in ``0 ..= x`` (a periodic count, so differences of it
        count any range, negative positions included)."""
        s, c = self.stride, self.summary
        n = x + 1
        return torch.div(n, s, rounding_mode="floor") * c + (n % s - (s - c)).clamp(min=0)

    def _summaries(self, first: Tensor, last: Tensor) -> Tensor:
        """Summary positions in ``first ..= last`` (0 for an empty range)."""
        return (self._summaries_upto(last) - self._summaries_upto(first - 1)).clamp(min=0) * (first <= last)

    def block_kinds(self, grid, batch, heads):
        qf, ql, kf, kl = _bounds(grid)
        s = self.stride
        blk = lambda p: torch.div(p, s, rounding_mode="floor")  # noqa: E731
        shared = torch.maximum(blk(qf), blk(kf)) <= torch.minimum(blk(ql), blk(kl))
        if self.causal:
            same_block = shared & (kf <= ql)
            summary = self._summaries(kf, torch.minimum(kl, ql)) > 0
        else:
            same_block = shared
            summary = self._summaries(kf, kl) > 0
        # Full: the keys that are not summaries all sit in the one block that holds every query.
        ordinary = (kl - kf + 1) - self._summaries(kf, kl)
        m = blk(qf)
        lo_in, hi_in = torch.maximum(kf, m * s), torch.minimum(kl, m * s + s - 1)
        ordinary_in = (hi_in - lo_in + 1).clamp(min=0) - self._summaries(lo_in, hi_in)
        full = (ordinary == 0) | ((blk(qf) == blk(ql)) & (ordinary_in == ordinary))
        if self.causal:
            full = full & (kl <= qf)
        return tile_kinds(~(same_block | summary), full)

    def __repr__(self):
        return f"sparse_fixed({self.stride}, summary={self.summary}, causal={self.causal})"


# --------------------------------------------------------------------------------------------
# Constructors (the public spelling)
# --------------------------------------------------------------------------------------------


def longformer(window: int, global_tokens: Sequence[int] | Tensor = (0,)) -> Mask:
    """Longformer: every token sees ``window // 2`` keys on each side, and the tokens at
    ``global_tokens`` (positions; default the first, e.g. ``[CLS]``) see and are seen by all."""
    window = _non_negative_int("longformer: window", window)
    return Longformer(window // 2, window // 2, global_tokens)


def bigbird(block_size: int = 64, window_blocks: int = 3, global_blocks: int = 2, random_blocks: int = 3,
            seed: int = 0) -> Mask:
    """BigBird (ITC): blocks of ``block_size``; each query block sees ``window_blocks`` blocks
    around it, the first ``global_blocks`` blocks (which see everything), and ``random_blocks``
    seeded random key blocks."""
    return BigBird(block_size, window_blocks, global_blocks, random_blocks, seed)


def dilated_window(left: int, right: int = 0, dilation: int | Sequence[int] = 1) -> Mask:
    """Dilated sliding window: keys ``q - j * dilation`` for ``-right <= j <= left``; ``dilation``
    an int or one per query head (e.g. Longformer's ``[1, 1, 2, 4]``)."""
    return DilatedWindow(left, right, dilation)


def sparse_strided(stride: int, causal: bool = True) -> Mask:
    """Sparse Transformer, strided: the previous ``stride`` keys and every ``stride``-th before."""
    return SparseStrided(stride, causal)


def sparse_fixed(stride: int, summary: int = 1, causal: bool = True) -> Mask:
    """Sparse Transformer, fixed: the query's own block of ``stride`` keys and the last
    ``summary`` keys of every block."""
    return SparseFixed(stride, summary, causal)


__all__ = ["Longformer", "BigBird", "DilatedWindow", "SparseStrided", "SparseFixed",
           "longformer", "bigbird", "dilated_window", "sparse_strided", "sparse_fixed"]
