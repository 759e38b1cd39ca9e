"""Attention masks as data.

A :class:`Mask` answers one question, "may the query at position ``q`` see the key at position
``k``?", for whole index tensors at once (like FlexAttention's ``mask_mod``), and a second one
for speed: "which ``(block_q x block_k)`` tiles of the score matrix are empty, full or partial?"
(:meth:`Mask.block_kinds`). Backends skip empty tiles and drop the per-element test on full ones.

Positions. Keys sit at positions ``0 .. Nk-1``. Queries are aligned bottom-right: query row ``i``
sits at position ``i + Nk - Nq``, so the last query and the last key share a position (as in
FlashAttention). With ``Nq == Nk`` that is the usual square picture; with ``Nq < Nk`` the queries
are the newest tokens of a decoding step; with ``Nq > Nk`` the first ``Nq - Nk`` queries have
negative positions and position-based masks (causal, window, ...) let them see nothing.

Index tensors. :meth:`Mask.allowed` receives ``b`` (batch), ``h`` (query head), ``q`` and ``k``
(positions) as int64 tensors that broadcast against each other, and returns a bool tensor of their
broadcast shape (or one that broadcasts to it). Only broadcasting ops are allowed inside, so the
same mask serves a whole score matrix, a tile of it, or the grouped layout of GQA.

Masks compose with ``&``, ``|`` and ``~``; block views compose exactly alongside (``&`` is the
element-wise minimum of tile kinds, ``|`` the maximum, ``~`` swaps empty and full).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .validate import positive_int

#: Tile kinds of a block view, ordered so that ``&`` is ``min`` and ``|`` is ``max``.
EMPTY, PARTIAL, FULL = 0, 1, 2

#: Elements evaluated at once when a block view has to be computed by evaluating the mask.
_EVAL_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TileGrid:
    """The tiling of an ``(Nq x Nk)`` score matrix into ``(block_q x block_k)`` tiles.

    Bounds are positions (see the module docstring): query tile ``i`` covers positions
    ``q_first[i] ..= q_last[i]``, key tile ``j`` covers ``k_first[j] ..= k_last[j]``.
    """

    nq: int
    nk: int
    block_q: int
    block_k: int
    device: torch.device = torch.device("cpu")

    @property
    def offset(self) -> int:
        """Position of query row 0."""
        return self.nk - self.nq

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.nq / self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.nk / self.block_k)

    def q_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last query position of each query tile, each ``(num_q_blocks,)``."""
        first = torch.arange(self.num_q_blocks, device=self.device) * self.block_q
        last = torch.clamp(first + self.block_q, max=self.nq) - 1
        return first + self.offset, last + self.offset

    def k_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last key position of each key tile, each ``(num_k_blocks,)``."""
        first = torch.arange(self.num_k_blocks, device=self.device) * self.block_k
        last = torch.clamp(first + self.block_k, max=self.nk) - 1
        return first, last


def tile_kinds(empty: Tensor, full: Tensor) -> Tensor:
    """Combine boolean ``empty``/``full`` tile tests into an int8 tensor of tile kinds."""
    kinds = torch.full(empty.shape, PARTIAL, dtype=torch.int8, device=empty.device)
    kinds[full] = FULL
    kinds[empty] = EMPTY
    return kinds


def _as_4d(kinds: Tensor) -> Tensor:
    while kinds.dim() < 4:
        kinds = kinds.unsqueeze(0)
    return kinds


def merge_over_batch_and_heads(kinds: Tensor) -> Tensor:
    """Reduce ``(B|1, H|1, nQB, nKB)`` tile kinds to ``(nQB, nKB)``: a tile is empty (full) only if
    it is empty (full) for every batch element and head."""
    flat = kinds.reshape(-1, *kinds.shape[-2:])
    lo, hi = flat.amin(0), flat.amax(0)
    return tile_kinds(hi == EMPTY, lo == FULL)


def count_tiles(allowed: Tensor, block_q: int, block_k: int) -> Tensor:
    """Tile kinds of a boolean matrix ``allowed`` of shape ``(..., R, C)``.

    A dimension of size 1 (a broadcast mask) counts as uniform along that axis; the result has
    ``ceil(R / block_q)`` (or 1) rows and ``ceil(C / block_k)`` (or 1) columns. Reduced as bool
    (``any``/``all`` per tile), a band of tile rows at a time: the extra memory is ``O(tiles)``
    plus at most one band (``_EVAL_CHUNK_ELEMENTS``), never a converted copy of the whole mask.
    """
    *lead, rows, cols = allowed.shape
    bq = 1 if rows == 1 else block_q
    bk = 1 if cols == 1 else block_k
    nkb = math.ceil(cols / bk)
    band = max(1, _EVAL_CHUNK_ELEMENTS // max(1, math.prod(lead) * bq * nkb * bk)) * bq  # rows per band
    kinds = []
    for r0 in range(0, rows, band):
        part = allowed[..., r0:r0 + band, :]
        kinds.append(tile_kinds(~_per_tile(part, bq, bk, torch.any), _per_tile(part, bq, bk, torch.all)))
    return torch.cat(kinds, dim=-2)


def _per_tile(x: Tensor, bq: int, bk: int, reduce) -> Tensor:
    """``reduce`` (``torch.any`` or ``torch.all``) over each ``(bq x bk)`` tile of ``x (..., R, C)``;
    the ragged last tile row and column are reduced over what they hold."""
    *lead, rows, cols = x.shape
    row_parts = [(0, rows // bq * bq, bq), (rows // bq * bq, rows, rows % bq)]
    col_parts = [(0, cols // bk * bk, bk), (cols // bk * bk, cols, cols % bk)]
    out_rows = []
    for r0, r1, rb in row_parts:
        if r1 == r0:
            continue
        out_cols = []
        for c0, c1, cb in col_parts:
            if c1 == c0:
                continue
            tiles = x[..., r0:r1, c0:c1].reshape(*lead, (r1 - r0) // rb, rb, (c1 - c0) // cb, cb)
            out_cols.append(reduce(reduce(tiles, dim=-1), dim=-2))
        out_rows.append(torch.cat(out_cols, dim=-1))
    return torch.cat(out_rows, dim=-2)


def position_grid(batch: int, heads: int, nq: int, nk: int, device) -> tuple[Tensor, ...]:
    """Index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q (1,1,Nq,1)``, ``k (1,1,1,Nk)`` in
    positions, for evaluating a mask or score modifier over a whole score matrix."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = (torch.arange(nq, device=device) + (nk - nq)).view(1, 1, -1, 1)
    k = torch.arange(nk, device=device).view(1, 1, 1, -1)
    return b, h, q, k


class Mask:
    """Base class of all masks. Subclasses implement :meth:`allowed`; they may override
    :meth:`block_kinds` with an analytic version and :meth:`bind` to validate their sizes."""

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Bool tensor: True where query position ``q`` may attend to key position ``k``."""
        raise NotImplementedError

    def bind(self, batch: int, heads: int, nq: int, nk: int, device) -> Mask:
        """Check this mask against a problem's sizes and return a mask ready to evaluate on
        ``device``. Raises ``ValueError`` naming what does not fit."""
        return self

    def block_kinds(self, grid: TileGrid, batch: int, heads: int) -> Tensor:
        """Tile kinds ``(B|1, H|1, nQB, nKB)`` int8 (``EMPTY``/``PARTIAL``/``FULL``).

        This default evaluates the mask chunk by chunk (exact, ``O(Nq * Nk)`` work, ``O(Nk)``
        memory per chunk); built-in masks override it with an ``O(tiles)`` analytic version."""
        return evaluate_block_kinds(self, grid, batch, heads)

    def _bound_copy(self, **fields) -> Mask:
        """A copy of this mask with ``fields`` replaced: how :meth:`bind` specialises a mask to
        one problem (tensors moved to its device, offsets known) without changing the original."""
        bound = copy.copy(self)
        bound.__dict__.update(fields)
        return bound

    def dense(self, batch: int, heads: int, nq: int, nk: int, device=None) -> Tensor:
        """The materialised mask, bool, broadcastable to ``(batch, heads, nq, nk)``."""
        b, h, q, k = position_grid(batch, heads, nq, nk, device)
        allowed = self.allowed(b, h, q, k)
        return torch.broadcast_to(allowed, torch.broadcast_shapes(allowed.shape, (1, 1, nq, nk)))

    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other, "&"))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other, "|"))

    def __invert__(self) -> Mask:
        return Not(self)


def _as_mask(other, op: str) -> Mask:
    if isinstance(other, Mask):
        return other
    if isinstance(other, Tensor) and other.dtype == torch.bool:
        return from_tensor(other)
    raise TypeError(f"cannot combine a Mask with {type(other).__name__} using '{op}'; "
                    "expected a qkv Mask or a bool tensor")


def evaluate_block_kinds(mask: Mask, grid: TileGrid, batch: int, heads: int) -> Tensor:
    """Tile kinds of ``mask`` found by evaluating it, a band of query tiles at a time."""
    b = torch.arange(batch, device=grid.device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=grid.device).view(1, -1, 1, 1)
    k = torch.arange(grid.nk, device=grid.device).view(1, 1, 1, -1)
    per_row = max(1, batch * heads * grid.nk)
    band = max(1, _EVAL_CHUNK_ELEMENTS // (per_row * grid.block_q)) * grid.block_q
    parts = []
    for r0 in range(0, grid.nq, band):
        r1 = min(grid.nq, r0 + band)
        q = (torch.arange(r0, r1, device=grid.device) + grid.offset).view(1, 1, -1, 1)
        allowed = mask.allowed(b, h, q, k)
        shape = torch.broadcast_shapes(allowed.shape, (1, 1, r1 - r0, grid.nk))
        parts.append(count_tiles(torch.broadcast_to(allowed, shape), grid.block_q, grid.block_k))
    return torch.cat(parts, dim=2)


# --------------------------------------------------------------------------------------------
# Built-in masks
# --------------------------------------------------------------------------------------------


class Causal(Mask):
    """Key ``k`` is visible from query ``q`` iff ``k <= q`` (bottom-right aligned)."""

    def allowed(self, b, h, q, k):
        return k <= q

    def block_kinds(self, grid, batch, heads):
        qf, ql = grid.q_bounds()
        kf, kl = grid.k_bounds()
        return tile_kinds(kf[None, :] > ql[:, None], kl[None, :] <= qf[:, None])[None, None]

    def __repr__(self):
        return "causal()"


class SlidingWindow(Mask):
    """Key ``k`` is visible from query ``q`` iff ``q - left <= k <= q + right``."""

    def __init__(self, left: int, right: int = 0):
        for name, value in (("left", left), ("right", right)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"sliding_window: {name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"sliding_window: {name} must be >= 0, got {value}")
        self.left, self.right = left, right

    def allowed(self, b, h, q, k):
        return (k >= q - self.left) & (k <= q + self.right)

    def block_kinds(self, grid, batch, heads):
        qf, ql = grid.q_bounds()
        kf, kl = grid.k_bounds()
        kf, kl, qf, ql = kf[None, :], kl[None, :], qf[:, None], ql[:, None]
        empty = (kl < qf - self.left) | (kf > ql + self.right)
        full = (kf >= ql - self.left) & (kl <= qf + self.right)
        return tile_kinds(empty, full)[None, None]

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


def _int_vector(name: str, value, *, allow_2d: bool = False) -> Tensor:
    """An int64 tensor from an int, a sequence of ints or an integer tensor."""
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() > (2 if allow_2d else 1):
        raise ValueError(f"{name} must be {'1-D or 2-D' if allow_2d else 'a scalar or 1-D'}, "
                         f"got shape {tuple(t.shape)}")
    return t.to(torch.int64).reshape(-1) if t.dim() == 0 else t.to(torch.int64)


def _broadcast_index(index: Tensor, size: int) -> Tensor:
    """``index`` into a dimension of ``size``, or zeros where that dimension is broadcast (size 1)."""
    return index if size > 1 else torch.zeros_like(index)


def _in_key_prefix(lengths: Tensor, b: Tensor, k: Tensor) -> Tensor:
    """``k < lengths[b]``: the key lies in its batch element's first ``lengths[b]`` positions."""
    return k < lengths[_broadcast_index(b, lengths.shape[0])]


def _key_prefix_kinds(lengths: Tensor, grid: TileGrid) -> Tensor:
    """Tile kinds ``(B|1, 1, nQB, nKB)`` of :func:`_in_key_prefix`: the same for every query tile."""
    kf, kl = grid.k_bounds()
    lengths = lengths.view(-1, 1, 1, 1)
    return tile_kinds(kf >= lengths, kl < lengths).expand(-1, -1, grid.num_q_blocks, -1)


class KeyPadding(Mask):
    """Key ``k`` is visible iff ``k < lengths[b]``: the first ``lengths[b]`` keys of batch
    element ``b`` are real, the rest padding."""

    def __init__(self, lengths):
        self.lengths = _int_vector("key_padding: lengths", lengths)

    def bind(self, batch, heads, nq, nk, device):
        n = self.lengths.numel()
        if n not in (1, batch):
            raise ValueError(f"key_padding: lengths has {n} entries, expected 1 or batch={batch}")
        if n and (int(self.lengths.min()) < 0 or int(self.lengths.max()) > nk):
            raise ValueError(f"key_padding: lengths must lie in [0, Nk={nk}], "
                             f"got {self.lengths.tolist()}")
        return self._bound_copy(lengths=self.lengths.to(device))

    def allowed(self, b, h, q, k):
        return _in_key_prefix(self.lengths, b, k)

    def block_kinds(self, grid, batch, heads):
        return _key_prefix_kinds(self.lengths, grid)

    def __repr__(self):
        return f"key_padding({self.lengths.tolist()})"


class Document(Mask):
    """Packed sequences: key ``k`` is visible iff it lies in the same document (segment id) as
    the query, and, with ``causal=True``, also ``k <= q``.

    ``segment_ids`` are per key position, ``(Nk,)`` or ``(B, Nk)``; queries take the id at their
    position. For cross-attention between two packed sequences pass ``q_segment_ids`` (``(Nq,)`` or
    ``(B, Nq)``), indexed by query row.
    """

    def __init__(self, segment_ids, causal: bool = False, q_segment_ids=None):
        self.segment_ids = self._as_rows(_int_vector("document: segment_ids", segment_ids, allow_2d=True))
        self.q_segment_ids = None if q_segment_ids is None else self._as_rows(
            _int_vector("document: q_segment_ids", q_segment_ids, allow_2d=True))
        self.causal = bool(causal)

    @staticmethod
    def _as_rows(ids: Tensor) -> Tensor:
        return ids.view(1, -1) if ids.dim() == 1 else ids

    def bind(self, batch, heads, nq, nk, device):
        for name, ids, n in (("segment_ids", self.segment_ids, nk), ("q_segment_ids", self.q_segment_ids, nq)):
            if ids is None:
                continue
            if ids.shape[0] not in (1, batch):
                raise ValueError(f"document: {name} has batch size {ids.shape[0]}, expected 1 or {batch}")
            if ids.shape[1] != n:
                raise ValueError(f"document: {name} has length {ids.shape[1]}, expected "
                                 f"{'Nk' if name == 'segment_ids' else 'Nq'}={n}")
        if self.q_segment_ids is None and nq > nk:
            raise ValueError(f"document: Nq={nq} > Nk={nk} leaves queries without a position in "
                             "segment_ids; pass q_segment_ids for cross-attention")
        return self._bound_copy(
            segment_ids=self.segment_ids.to(device), _offset=nk - nq,
            q_segment_ids=None if self.q_segment_ids is None else self.q_segment_ids.to(device))

    def _query_ids(self, b: Tensor, q: Tensor) -> Tensor:
        if self.q_segment_ids is not None:
            return self._gather(self.q_segment_ids, b, q - self._offset)
        return self._gather(self.segment_ids, b, q)

    @staticmethod
    def _gather(ids: Tensor, b: Tensor, pos: Tensor) -> Tensor:
        return ids[_broadcast_index(b, ids.shape[0]), pos]

    def allowed(self, b, h, q, k):
        same = self._query_ids(b, q) == self._gather(self.segment_ids, b, k)
        return same & (k <= q) if self.causal else same

    def block_kinds(self, grid, batch, heads):
        sorted_ids = all(ids is None or bool((ids[:, 1:] >= ids[:, :-1]).all())
                         for ids in (self.segment_ids, self.q_segment_ids))
        if not sorted_ids:
            return evaluate_block_kinds(self, grid, batch, heads)
        qf, ql = grid.q_bounds()
        kf, kl = grid.k_bounds()
        if self.q_segment_ids is None:
            q_ids, q_lo, q_hi = self.segment_ids, qf, ql
        else:
            q_ids, q_lo, q_hi = self.q_segment_ids, qf - grid.offset, ql - grid.offset
        # Sorted ids: a tile's id range is given by its first and last position.
        q_min, q_max = q_ids[:, q_lo][:, :, None], q_ids[:, q_hi][:, :, None]
        k_min, k_max = self.segment_ids[:, kf][:, None, :], self.segment_ids[:, kl][:, None, :]
        empty = (q_max < k_min) | (k_max < q_min)
        full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        kinds = tile_kinds(empty, full)[:, None]
        return torch.minimum(kinds, Causal().block_kinds(grid, batch, heads)) if self.causal else kinds

    def __repr__(self):
        return f"document(<{tuple(self.segment_ids.shape)} ids>, causal={self.causal})"


class GlobalTokens(Mask):
    """Global tokens (as in Longformer/BigBird): the tokens at ``indices`` attend to every key
    and every query attends to them. Combine with a local mask: ``sliding_window(w) | global_tokens(idx)``."""

    def __init__(self, indices):
        self.indices = _int_vector("global_tokens: indices", indices)

    def bind(self, batch, heads, nq, nk, device):
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= nk):
            raise ValueError(f"global_tokens: indices must lie in [0, Nk={nk}), got {self.indices.tolist()}")
        is_global = torch.zeros(nk + 1, dtype=torch.bool, device=device)  # last slot: "no position"
        is_global[self.indices.to(device)] = True
        return self._bound_copy(_is_global=is_global, _nk=nk)

    def _flag(self, pos: Tensor) -> Tensor:
        return self._is_global[torch.where(pos < 0, self._nk, pos)]

    def allowed(self, b, h, q, k):
        return self._flag(q) | self._flag(k)

    def _tile_any_all(self, first: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        counts = torch.cat([self._is_global.new_zeros(1, dtype=torch.int64),
                            self._is_global[:-1].to(torch.int64).cumsum(0)])
        lo, hi = first.clamp(min=0), (last + 1).clamp(min=0)
        n = counts[hi] - counts[lo]
        return n > 0, n == (last + 1 - first)

    def block_kinds(self, grid, batch, heads):
        q_any, q_all = self._tile_any_all(*grid.q_bounds())
        k_any, k_all = self._tile_any_all(*grid.k_bounds())
        empty = ~q_any[:, None] & ~k_any[None, :]
        full = q_all[:, None] | k_all[None, :]
        return tile_kinds(empty, full)[None, None]

    def __repr__(self):
        return f"global_tokens({self.indices.tolist()})"


class BlockSparse(Mask):
    """Block-sparse attention: ``layout[..., q // block_size, k // block_size]`` (positions) says
    whether a whole ``block_size x block_size`` block may attend. ``layout`` is bool,
    ``(nQ, nK)`` or ``(B|1, H|1, nQ, nK)``, covering ``ceil(Nk / block_size)`` blocks both ways."""

    def __init__(self, layout: Tensor, block_size: int):
        if not isinstance(layout, Tensor) or layout.dtype != torch.bool:
            raise TypeError("block_sparse: layout must be a bool tensor")
        if layout.dim() not in (2, 4):
            raise ValueError(f"block_sparse: layout must be 2-D or 4-D, got shape {tuple(layout.shape)}")
        self.layout = _as_4d(layout)
        self.block_size = positive_int("block_sparse: block_size", block_size)

    def bind(self, batch, heads, nq, nk, device):
        need = math.ceil(nk / self.block_size)
        lb, lh, lq, lk = self.layout.shape
        if lb not in (1, batch) or lh not in (1, heads):
            raise ValueError(f"block_sparse: layout shape {tuple(self.layout.shape)} does not match "
                             f"batch={batch}, heads={heads}")
        if lq < need or lk < need:
            raise ValueError(f"block_sparse: layout {lq}x{lk} does not cover Nk={nk} positions in "
                             f"blocks of {self.block_size} ({need}x{need} needed)")
        return self._bound_copy(layout=self.layout.to(device))

    def allowed(self, b, h, q, k):
        lb, lh = self.layout.shape[:2]
        cell = self.layout[_broadcast_index(b, lb), _broadcast_index(h, lh), q.clamp(min=0) // self.block_size,
                           k // self.block_size]
        return cell & (q >= 0)

    def block_kinds(self, grid, batch, heads):
        qf, ql = grid.q_bounds()
        kf, kl = grid.k_bounds()
        bs = self.block_size
        # 2-D prefix sums over the layout: count of allowed cells in any rectangle.
        sums = torch.nn.functional.pad(self.layout.to(torch.int64).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        r0, r1 = qf.clamp(min=0) // bs, ql.clamp(min=-1) // bs + 1
        c0, c1 = kf // bs, kl // bs + 1
        r0, r1, c0, c1 = r0[:, None], r1[:, None], c0[None, :], c1[None, :]
        count = sums[..., r1, c1] - sums[..., r0, c1] - sums[..., r1, c0] + sums[..., r0, c0]
        area = (r1 - r0).clamp(min=0) * (c1 - c0)
        no_negative_rows = (qf >= 0)[:, None]  # queries before position 0 see nothing
        return tile_kinds(count == 0, (count == area) & (area > 0) & no_negative_rows)

    def __repr__(self):
        return f"block_sparse(<{tuple(self.layout.shape)} layout>, block_size={self.block_size})"


class TensorMask(Mask):
    """A materialised bool mask, broadcastable to ``(B, H, Nq, Nk)``, indexed by query row."""

    def __init__(self, tensor: Tensor):
        if not isinstance(tensor, Tensor) or tensor.dtype != torch.bool:
            raise TypeError("from_tensor: expected a bool tensor (True = may attend)")
        if tensor.dim() > 4:
            raise ValueError(f"mask: expected at most 4 dims (B, H, Nq, Nk), got shape {tuple(tensor.shape)}")
        self.given_shape = tuple(tensor.shape)
        self.tensor = _as_4d(tensor)

    def bind(self, batch, heads, nq, nk, device):
        expected = (batch, heads, nq, nk)
        for size, want, name in zip(self.tensor.shape, expected, ("batch", "heads", "Nq", "Nk")):
            if size not in (1, want):
                raise ValueError(f"mask: shape {self.given_shape} does not broadcast to "
                                 f"(B, H, Nq, Nk) = {expected} ({name}: {size} vs {want})")
        if device is not None and self.tensor.device != torch.device(device):
            raise ValueError(f"mask: on {self.tensor.device}, but q is on {device}")
        return self._bound_copy(_offset=nk - nq)

    def allowed(self, b, h, q, k):
        rows = q - self._offset
        index = [_broadcast_index(i, size) for i, size in zip((b, h, rows, k), self.tensor.shape)]
        return self.tensor[tuple(index)]

    def block_kinds(self, grid, batch, heads):
        kinds = count_tiles(self.tensor, grid.block_q, grid.block_k)
        return kinds.expand(-1, -1, grid.num_q_blocks, grid.num_k_blocks)

    def dense(self, batch, heads, nq, nk, device=None):
        return self.tensor

    def __repr__(self):
        return f"from_tensor(<{self.given_shape}>)"


class FunctionMask(Mask):
    """A mask from a function ``fn(b, h, q, k) -> bool tensor`` over positions."""

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], name: str | None = None):
        if not callable(fn):
            raise TypeError("from_function: fn must be callable")
        self.fn, self.name = fn, name or getattr(fn, "__name__", "fn")

    def allowed(self, b, h, q, k):
        return self.fn(b, h, q, k)

    def __repr__(self):
        return f"from_function({self.name})"


class _Combined(Mask):
    def __init__(self, *parts: Mask):
        self.parts = parts

    def bind(self, batch, heads, nq, nk, device):
        return type(self)(*(p.bind(batch, heads, nq, nk, device) for p in self.parts))


class And(_Combined):
    def allowed(self, b, h, q, k):
        a, c = self.parts
        return a.allowed(b, h, q, k) & c.allowed(b, h, q, k)

    def block_kinds(self, grid, batch, heads):
        a, c = self.parts
        return torch.minimum(a.block_kinds(grid, batch, heads), c.block_kinds(grid, batch, heads))

    def __repr__(self):
        return f"({self.parts[0]!r} & {self.parts[1]!r})"


class Or(_Combined):
    def allowed(self, b, h, q, k):
        a, c = self.parts
        return a.allowed(b, h, q, k) | c.allowed(b, h, q, k)

    def block_kinds(self, grid, batch, heads):
        a, c = self.parts
        return torch.maximum(a.block_kinds(grid, batch, heads), c.block_kinds(grid, batch, heads))

    def __repr__(self):
        return f"({self.parts[0]!r} | {self.parts[1]!r})"


class Not(_Combined):
    def allowed(self, b, h, q, k):
        return ~self.parts[0].allowed(b, h, q, k)

    def block_kinds(self, grid, batch, heads):
        return FULL - self.parts[0].block_kinds(grid, batch, heads)

    def __repr__(self):
        return f"~{self.parts[0]!r}"


class PrefixLM(Mask):
    """Prefix-LM: the first ``prefix_len[b]`` keys are visible to every query, the rest causally.
    A prefix longer than the sequence makes the whole sequence bidirectional."""

    def __init__(self, prefix_len):
        self.prefix_len = _int_vector("prefix_lm: prefix_len", prefix_len)
        if self.prefix_len.numel() and int(self.prefix_len.min()) < 0:
            raise ValueError(f"prefix_lm: prefix_len must be >= 0, got {self.prefix_len.tolist()}")

    def bind(self, batch, heads, nq, nk, device):
        if self.prefix_len.numel() not in (1, batch):
            raise ValueError(f"prefix_lm: prefix_len has {self.prefix_len.numel()} entries, expected 1 or batch={batch}")
        return self._bound_copy(prefix_len=self.prefix_len.to(device))

    def allowed(self, b, h, q, k):
        return _in_key_prefix(self.prefix_len, b, k) | (k <= q)

    def block_kinds(self, grid, batch, heads):
        return torch.maximum(_key_prefix_kinds(self.prefix_len, grid), Causal().block_kinds(grid, batch, heads))

    def __repr__(self):
        return f"prefix_lm({self.prefix_len.tolist()})"


# --------------------------------------------------------------------------------------------
# Constructors (the public spelling)
# --------------------------------------------------------------------------------------------


def causal() -> Mask:
    """Causal (decoder) mask, aligned bottom-right: query ``i`` of ``Nq`` sees keys
    ``0 .. i + Nk - Nq``."""
    return Causal()


def sliding_window(left: int, right: int = 0) -> Mask:
    """Local attention: query at position ``q`` sees keys ``q - left ..= q + right``.
    ``sliding_window(w)`` is causal local attention over the current and ``w`` previous tokens."""
    return SlidingWindow(left, right)


def key_padding(lengths) -> Mask:
    """Only the first ``lengths[b]`` keys of batch element ``b`` are visible (int or ``(B,)``)."""
    return KeyPadding(lengths)


def document(segment_ids, causal: bool = False, q_segment_ids=None) -> Mask:
    """Packed sequences: attend only within the same segment id (optionally causally)."""
    return Document(segment_ids, causal=causal, q_segment_ids=q_segment_ids)


def prefix_lm(prefix_len) -> Mask:
    """Bidirectional over the first ``prefix_len`` keys (int or ``(B,)``), causal after."""
    return PrefixLM(prefix_len)


def global_tokens(indices: Sequence[int] | Tensor) -> Mask:
    """Tokens at ``indices`` (positions) see everything and are seen by everything."""
    return GlobalTokens(indices)


def block_sparse(layout: Tensor, block_size: int) -> Mask:
    """Block-sparse layout mask, ``layout[..., q // block_size, k // block_size]``."""
    return BlockSparse(layout, block_size)


def from_tensor(mask: Tensor) -> Mask:
    """A materialised bool mask (True = may attend), broadcastable to ``(B, H, Nq, Nk)``."""
    return TensorMask(mask)


def from_function(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor], name: str | None = None) -> Mask:
    """A custom mask ``fn(b, h, q, k) -> bool`` over broadcastable index tensors (positions)."""
    return FunctionMask(fn, name)


__all__ = [
    "EMPTY", "PARTIAL", "FULL", "TileGrid", "Mask",
    "causal", "sliding_window", "key_padding", "document", "prefix_lm", "global_tokens",
    "block_sparse", "from_tensor", "from_function",
]
