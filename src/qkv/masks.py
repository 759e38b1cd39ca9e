"""Attention masks as data.

A :class:`Mask` answers one question, "may the query at position ``q`` see the key at position
``k``?", for whole index tensors at once (like FlexAttention's ``mask_mod``), and a second one
for speed: "which ``(block_q x block_k)`` tiles of the score matrix are empty, full or partial?"
(:meth:`Mask.block_kinds`). Backends skip empty tiles and drop the per-element test on full ones.

Positions (:mod:`qkv.positions`). Key column ``j`` of batch element ``b`` sits at position
``k_offset[b] + j`` and query row ``i`` at ``q_offset[b] + i``. By default keys sit at ``0 .. Nk-1``
and queries are aligned bottom-right (``q_offset = Nk - Nq``): the last query and the last key
share a position (as in FlashAttention). With ``Nq == Nk`` that is the usual square picture; with
``Nq < Nk`` the queries are the newest tokens of a decoding step; with ``Nq > Nk`` the first
``Nq - Nk`` queries have negative positions and position-based masks (causal, window, ...) let
them see nothing. A key chunk of a longer sequence passes ``k_offset`` (and ``q_offset``).
Masks holding per-position tables (document ids, global token indices, block layouts) index them
by position; a materialised tensor mask is indexed by row and column.

Index tensors. :meth:`Mask.allowed` receives ``b`` (batch), ``h`` (query head), ``q`` and ``k``
(positions) as int64 tensors that broadcast against each other, and returns a bool tensor of their
broadcast shape (or one that broadcasts to it). Only broadcasting ops are allowed inside, so the
same mask serves a whole score matrix, a tile of it, or the grouped layout of GQA.

Masks compose with ``&``, ``|`` and ``~``; block views compose exactly alongside (``&`` is the
element-wise minimum of tile kinds, ``|`` the maximum, ``~`` swaps empty and full).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import TileKind, merge_kinds
from .positions import Positions
from .validate import positive_int

#: Tile kinds of a block view, ordered so that ``&`` is ``min`` and ``|`` is ``max``
#: (aliases of :class:`qkv.layout.TileKind`).
EMPTY, PARTIAL, FULL = TileKind.EMPTY, TileKind.PARTIAL, TileKind.FULL

#: Elements evaluated at once when a block view has to be computed by evaluating the mask.
_EVAL_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TileGrid:
    """The tiling of an ``(Nq x Nk)`` score matrix into ``(block_q x block_k)`` tiles.

    Tiles are cut along rows and columns; their bounds are returned as positions (see
    :mod:`qkv.positions`; ``positions=None`` is the default bottom-right rule). Query tile ``i``
    covers positions ``q_first[..., i, :] ..= q_last[..., i, :]``, key tile ``j`` covers
    ``k_first[..., j] ..= k_last[..., j]``; with per-batch offsets the bounds differ per batch.
    """

    nq: int
    nk: int
    block_q: int
    block_k: int
    device: torch.device = torch.device("cpu")
    positions: Positions | None = None

    def __post_init__(self):
        if self.positions is None:
            object.__setattr__(self, "positions", Positions.default(self.nq, self.nk))

    @property
    def offset(self) -> int:
        """Position of query row 0 (only when it is one int for the whole batch)."""
        off = self.positions.q_offset
        if not isinstance(off, int):
            raise ValueError("TileGrid.offset: the query offset differs per batch element; use query_bounds()")
        return off

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.nq / self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.nk / self.block_k)

    def q_rows(self) -> tuple[Tensor, Tensor]:
        """First and last query row of each query tile, each ``(1, 1, nQB, 1)``."""
        first = torch.arange(self.num_q_blocks, device=self.device) * self.block_q
        last = torch.clamp(first + self.block_q, max=self.nq) - 1
        return first.view(1, 1, -1, 1), last.view(1, 1, -1, 1)

    def k_cols(self) -> tuple[Tensor, Tensor]:
        """First and last key column of each key tile, each ``(1, 1, 1, nKB)``."""
        first = torch.arange(self.num_k_blocks, device=self.device) * self.block_k
        last = torch.clamp(first + self.block_k, max=self.nk) - 1
        return first.view(1, 1, 1, -1), last.view(1, 1, 1, -1)

    def query_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last query position of each query tile, each ``(B|1, 1, nQB, 1)``."""
        first, last = self.q_rows()
        return self.positions.queries(first), self.positions.queries(last)

    def key_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last key position of each key tile, each ``(B|1, 1, 1, nKB)``."""
        first, last = self.k_cols()
        return self.positions.keys(first), self.positions.keys(last)

    def q_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last query position of each query tile, each ``(nQB,)``; only for offsets
        that are the same for the whole batch (else use :meth:`query_bounds`)."""
        self._require_scalar("q_bounds", "query_bounds")
        return tuple(x.reshape(-1) for x in self.query_bounds())

    def k_bounds(self) -> tuple[Tensor, Tensor]:
        """First and last key position of each key tile, each ``(nKB,)``; only for offsets that
        are the same for the whole batch (else use :meth:`key_bounds`)."""
        self._require_scalar("k_bounds", "key_bounds")
        return tuple(x.reshape(-1) for x in self.key_bounds())

    def _require_scalar(self, old: str, new: str) -> None:
        if not self.positions.scalar:
            raise ValueError(f"TileGrid.{old}: the offsets differ per batch element; use TileGrid.{new}() "
                             "(bounds per batch element)")


def tile_kinds(empty: Tensor, full: Tensor) -> Tensor:
    """Combine boolean ``empty``/``full`` tile tests (broadcast against each other) into an int8
    tensor of tile kinds."""
    empty, full = torch.broadcast_tensors(empty, full)
    kinds = torch.full(empty.shape, int(PARTIAL), dtype=torch.int8, device=empty.device)
    kinds[full] = int(FULL)
    kinds[empty] = int(EMPTY)
    return kinds


def _as_4d(kinds: Tensor) -> Tensor:
    while kinds.dim() < 4:
        kinds = kinds.unsqueeze(0)
    return kinds


def merge_over_batch_and_heads(kinds: Tensor) -> Tensor:
    """Reduce ``(B|1, H|1, nQB, nKB)`` tile kinds to ``(nQB, nKB)``: a tile is empty (full) only if
    it is empty (full) for every batch element and head (:func:`qkv.layout.merge_kinds`)."""
    return merge_kinds(kinds)




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


def position_grid(batch: int, heads: int, nq: int, nk: int, device, positions: Positions | None = None
                  ) -> tuple[Tensor, ...]:
    """Index tensors ``b (B,1,1,1)``, ``h (1,H,1,1)``, ``q (B|1,1,Nq,1)``, ``k (B|1,1,1,Nk)`` in
    positions (default: bottom-right), for evaluating a mask or score modifier over a whole score
    matrix."""
    return (positions or Positions.default(nq, nk)).grid(batch, heads, device)


_TAKES_POSITIONS: dict[type, bool] = {}


def bind_mask(mask: Mask, batch: int, heads: int, nq: int, nk: int, device, positions: Positions | None = None
              ) -> Mask:
    """``mask.bind(...)`` with the call's positions. A mask class whose ``bind`` predates positions
    (no ``positions`` parameter) is bound the old way and accepted only at the default positions."""
    cls = type(mask)
    if cls not in _TAKES_POSITIONS:
        _TAKES_POSITIONS[cls] = "positions" in inspect.signature(cls.bind).parameters
    if _TAKES_POSITIONS[cls]:
        return mask.bind(batch, heads, nq, nk, device, positions=positions)
    if positions is not None and not positions.is_default:
        raise ValueError(f"mask {mask!r}: its bind() takes no positions, so it cannot be used with "
                         f"q_offset/k_offset ({positions!r}); add a `positions` parameter to its bind()")
    return mask.bind(batch, heads, nq, nk, device)


class Mask:
    """Base class of all masks. Subclasses implement :meth:`allowed`; they may override
    :meth:`block_kinds` with an analytic version and :meth:`bind` to validate their sizes."""

    #: Rough cost of evaluating :meth:`allowed` on one score, in element-wise operations (a
    #: comparison is 1, a table lookup 2): what a kernel pays per score of a partial tile. Only
    #: the cost estimates read it; masks that do not say are assumed to cost 4.
    work: float = 4.0

    def allowed(self, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Bool tensor: True where query position ``q`` may attend to key position ``k``."""
        raise NotImplementedError

    def bind(self, batch: int, heads: int, nq: int, nk: int, device, positions: Positions | None = None) -> Mask:
        """Check this mask against a problem's sizes and positions (``None``: the default,
        bottom-right) and return a mask ready to evaluate on ``device``. Raises ``ValueError``
        naming what does not fit. The original mask is left unchanged."""
        return self

    def block_kinds(self, grid: TileGrid, batch: int, heads: int) -> Tensor:
        """Tile kinds ``(B|1, H|1, nQB, nKB)`` int8 (``EMPTY``/``PARTIAL``/``FULL``).

        This default evaluates the mask chunk by chunk (exact, ``O(Nq * Nk)`` work, ``O(Nk)``
        memory per chunk); built-in masks override it with an ``O(tiles)`` analytic version."""
        return evaluate_block_kinds(self, grid, batch, heads)

    @property
    def analytic_block_view(self) -> bool:
        """True when :meth:`block_kinds` is computed from tile bounds (``O(tiles)``), False when it
        would evaluate the mask element by element (``O(Nq * Nk)``): the dispatcher then estimates
        without it."""
        return type(self).block_kinds is not Mask.block_kinds

    def _bound_copy(self, **fields) -> Mask:
        """A copy of this mask with ``fields`` replaced: how :meth:`bind` specialises a mask to
        one problem (tensors moved to its device, offsets known) without changing the original."""
        bound = copy.copy(self)
        bound.__dict__.update(fields)
        return bound

    def dense(self, batch: int, heads: int, nq: int, nk: int, device=None, positions: Positions | None = None
              ) -> Tensor:
        """The materialised mask, bool, broadcastable to ``(batch, heads, nq, nk)``. The mask binds
        itself to these sizes first (``ValueError`` if it does not fit)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        bound = bind_mask(self, batch, heads, nq, nk, device, positions)
        b, h, q, k = position_grid(batch, heads, nq, nk, device, positions)
        allowed = bound.allowed(b, h, q, k)
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
    k = grid.positions.keys(torch.arange(grid.nk, device=grid.device).view(1, 1, 1, -1))
    per_row = max(1, batch * heads * grid.nk)
    band = max(1, _EVAL_CHUNK_ELEMENTS // (per_row * grid.block_q)) * grid.block_q
    parts = []
    for r0 in range(0, grid.nq, band):
        r1 = min(grid.nq, r0 + band)
        q = grid.positions.queries(torch.arange(r0, r1, device=grid.device).view(1, 1, -1, 1))
        allowed = mask.allowed(b, h, q, k)
        shape = torch.broadcast_shapes(allowed.shape, (1, 1, r1 - r0, grid.nk))
        parts.append(count_tiles(torch.broadcast_to(allowed, shape), grid.block_q, grid.block_k))
    return torch.cat(parts, dim=2)


# --------------------------------------------------------------------------------------------
# Built-in masks
# --------------------------------------------------------------------------------------------


class Causal(Mask):
    """Key ``k`` is visible from query ``q`` iff ``k <= q`` (positions; bottom-right by default)."""

    work = 1.0  # k <= q

    def allowed(self, b, h, q, k):
        return k <= q

    def block_kinds(self, grid, batch, heads):
        qf, ql = grid.query_bounds()
        kf, kl = grid.key_bounds()
        return tile_kinds(kf > ql, kl <= qf)

    def __repr__(self):
        return "causal()"


#: The widest window a mask stores: wider ones (``sliding_window(10**30)``) mean the same.
WIDEST_WINDOW = 1 << 53


class SlidingWindow(Mask):
    """Key ``k`` is visible from query ``q`` iff ``q - left <= k <= q + right``."""

    work = 3.0  # two comparisons and an and

    def __init__(self, left: int, right: int = 0):
        for name, value in (("left", left), ("right", right)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"sliding_window: {name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"sliding_window: {name} must be >= 0, got {value}")
        # Wider than any sequence is unbounded; capped so that position arithmetic stays in int64.
        self.left, self.right = min(left, WIDEST_WINDOW), min(right, WIDEST_WINDOW)

    def allowed(self, b, h, q, k):
        return (k >= q - self.left) & (k <= q + self.right)

    def block_kinds(self, grid, batch, heads):
        qf, ql = grid.query_bounds()
        kf, kl = grid.key_bounds()
        empty = (kl < qf - self.left) | (kf > ql + self.right)
        full = (kf >= ql - self.left) & (kl <= qf + self.right)
        return tile_kinds(empty, full)

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


def _int_vector(name: str, value, *, allow_2d: bool = False) -> Tensor:
    """An int64 tensor from an int, a sequence of ints or an integer tensor."""
    if not isinstance(value, Tensor) and isinstance(value, (list, tuple)) and len(value) == 0:
        value = torch.zeros(0, dtype=torch.int64)  # torch.as_tensor([]) would be float32
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


def _table_batch(table: Tensor) -> Tensor:
    """``(n, 1, 1, 1)`` batch indices into the rows of a per-batch table (``n`` = its rows)."""
    return torch.arange(table.shape[0], device=table.device).view(-1, 1, 1, 1)


def _in_key_prefix(lengths: Tensor, b: Tensor, k: Tensor) -> Tensor:
    """``k < lengths[b]``: the key lies in its batch element's first ``lengths[b]`` positions."""
    return k < lengths[_broadcast_index(b, lengths.shape[0])]


def _key_prefix_kinds(lengths: Tensor, grid: TileGrid) -> Tensor:
    """Tile kinds ``(B|1, 1, nQB, nKB)`` of :func:`_in_key_prefix`: the same for every query tile."""
    kf, kl = grid.key_bounds()
    lengths = lengths.view(-1, 1, 1, 1)
    return tile_kinds(kf >= lengths, kl < lengths).expand(-1, -1, grid.num_q_blocks, -1)


def _positions(positions: Positions | None, nq: int, nk: int) -> Positions:
    return positions if positions is not None else Positions.default(nq, nk)


class KeyPadding(Mask):
    """Key ``k`` is visible iff ``k < lengths[b]`` (a position): the first ``lengths[b]`` keys of
    batch element ``b`` are real, the rest padding."""

    work = 1.0  # k < length[b]

    def __init__(self, lengths):
        self.lengths = _int_vector("key_padding: lengths", lengths)

    def bind(self, batch, heads, nq, nk, device, positions=None):
        n = self.lengths.numel()
        if n not in (1, batch):
            raise ValueError(f"key_padding: lengths has {n} entries, expected 1 or batch={batch}")
        explicit = positions is not None and positions.explicit
        if n and (int(self.lengths.min()) < 0 or (not explicit and int(self.lengths.max()) > nk)):
            raise ValueError(f"key_padding: lengths must lie in [0, Nk={nk}], "
                             f"got {self.lengths.tolist()}" if not explicit else
                             f"key_padding: lengths must be >= 0, got {self.lengths.tolist()}")
        return self._bound_copy(lengths=self.lengths.to(device))

    def allowed(self, b, h, q, k):
        return _in_key_prefix(self.lengths, b, k)

    def block_kinds(self, grid, batch, heads):
        return _key_prefix_kinds(self.lengths.to(grid.device), grid)

    def __repr__(self):
        return f"key_padding({self.lengths.tolist()})"


class Document(Mask):
    """Packed sequences: key ``k`` is visible iff it lies in the same document (segment id) as
    the query, and, with ``causal=True``, also ``k <= q``.

    ``segment_ids`` are per position, ``(L,)`` or ``(B, L)``, covering every key position (and every
    query position); queries take the id at their position. For cross-attention between two packed
    sequences pass ``q_segment_ids`` (``(Nq,)`` or ``(B, Nq)``), indexed by query row.
    """

    @property
    def work(self) -> float:
        return 4.0 if self.causal else 2.0  # two lookups compared (and k <= q)

    def __init__(self, segment_ids, causal: bool = False, q_segment_ids=None):
        self.segment_ids = self._as_rows(_int_vector("document: segment_ids", segment_ids, allow_2d=True))
        self.q_segment_ids = None if q_segment_ids is None else self._as_rows(
            _int_vector("document: q_segment_ids", q_segment_ids, allow_2d=True))
        self.causal = bool(causal)
        self._positions = None
        self._sorted = None  # are the ids non-decreasing along each row? (found once, see block_kinds)

    @staticmethod
    def _as_rows(ids: Tensor) -> Tensor:
        return ids.view(1, -1) if ids.dim() == 1 else ids

    def bind(self, batch, heads, nq, nk, device, positions=None):
        pos = _positions(positions, nq, nk)
        for name, ids in (("segment_ids", self.segment_ids), ("q_segment_ids", self.q_segment_ids)):
            if ids is not None and ids.shape[0] not in (1, batch):
                raise ValueError(f"document: {name} has batch size {ids.shape[0]}, expected 1 or {batch}")
        if self.q_segment_ids is not None and self.q_segment_ids.shape[1] != nq:
            raise ValueError(f"document: q_segment_ids has length {self.q_segment_ids.shape[1]}, expected Nq={nq}")
        length = self.segment_ids.shape[1]
        if not pos.explicit:
            if length != nk:
                raise ValueError(f"document: segment_ids has length {length}, expected Nk={nk}")
            if self.q_segment_ids is None and nq > nk:
                raise ValueError(f"document: Nq={nq} > Nk={nk} leaves queries without a position in "
                                 "segment_ids; pass q_segment_ids for cross-attention")
        else:
            spans = [("key", pos.key_span())] + ([("query", pos.query_span())] if self.q_segment_ids is None else [])
            for what, (lo, hi) in spans:
                if hi >= lo and (lo < 0 or hi >= length):
                    raise ValueError(f"document: {what} positions {lo}..{hi} are not covered by segment_ids "
                                     f"of length {length} (indexed by position)"
                                     + ("; pass q_segment_ids for cross-attention" if what == "query" else ""))
        return self._bound_copy(
            segment_ids=self.segment_ids.to(device), _positions=pos.to(device),
            q_segment_ids=None if self.q_segment_ids is None else self.q_segment_ids.to(device))

    def _table_versions(self) -> tuple:
        return tuple(None if t is None else t._version for t in (self.segment_ids, self.q_segment_ids))

    def _query_ids(self, b: Tensor, q: Tensor) -> Tensor:
        if self.q_segment_ids is not None:
            if self._positions is None:
                raise ValueError(f"{self!r} with q_segment_ids is not bound to a problem: call "
                                 "mask.bind(batch, heads, nq, nk, device) first or pass it to qkv.attention")
            return self._gather(self.q_segment_ids, b, self._positions.query_rows(b, q))
        return self._gather(self.segment_ids, b, q)

    @staticmethod
    def _gather(ids: Tensor, b: Tensor, pos: Tensor) -> Tensor:
        return ids[_broadcast_index(b, ids.shape[0]), pos]

    def allowed(self, b, h, q, k):
        same = self._query_ids(b, q) == self._gather(self.segment_ids, b, k)
        return same & (k <= q) if self.causal else same

    def block_kinds(self, grid, batch, heads):
        if self._sorted is None or self._sorted[0] != self._table_versions():
            sorted_ids = all(ids is None or bool((ids[:, 1:] >= ids[:, :-1]).all())
                             for ids in (self.segment_ids, self.q_segment_ids))
            self._sorted = (self._table_versions(), sorted_ids)  # one host sync per table, not per call
        if not self._sorted[1]:
            return evaluate_block_kinds(self, grid, batch, heads)
        kf, kl = grid.key_bounds()
        if self.q_segment_ids is None:
            q_ids, (q_lo, q_hi) = self.segment_ids, grid.query_bounds()
        else:
            q_ids, (q_lo, q_hi) = self.q_segment_ids, grid.q_rows()
        # Sorted ids: a tile's id range is given by its first and last position.
        kb, qb = _table_batch(self.segment_ids), _table_batch(q_ids)
        q_min, q_max = q_ids[qb, q_lo], q_ids[qb, q_hi]
        k_min, k_max = self.segment_ids[kb, kf], self.segment_ids[kb, kl]
        empty = (q_max < k_min) | (k_max < q_min)
        full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        kinds = tile_kinds(empty, full)
        return torch.minimum(kinds, Causal().block_kinds(grid, batch, heads)) if self.causal else kinds

    def __repr__(self):
        return f"document(<{tuple(self.segment_ids.shape)} ids>, causal={self.causal})"


class GlobalTokens(Mask):
    """Global tokens (as in Longformer/BigBird): the tokens at positions ``indices`` attend to
    every key and every query attends to them. Combine with a local mask:
    ``sliding_window(w) | global_tokens(idx)``."""

    work = 4.0  # a flag per query and per key, or-ed

    def __init__(self, indices):
        self.indices = torch.unique(_int_vector("global_tokens: indices", indices))  # sorted

    def bind(self, batch, heads, nq, nk, device, positions=None):
        explicit = positions is not None and positions.explicit
        if self.indices.numel() and (int(self.indices[0]) < 0 or (not explicit and int(self.indices[-1]) >= nk)):
            raise ValueError(f"global_tokens: indices must lie in [0, Nk={nk}), got {self.indices.tolist()}"
                             if not explicit else f"global_tokens: indices must be >= 0, got {self.indices.tolist()}")
        return self._bound_copy(indices=self.indices.to(device))

    def _count_up_to(self, pos: Tensor, right: bool) -> Tensor:
        """How many global positions are ``< pos`` (``<= pos`` with ``right``)."""
        return torch.searchsorted(self.indices.to(pos.device), pos.contiguous(), right=right)

    def _flag(self, pos: Tensor) -> Tensor:
        return self._count_up_to(pos, True) > self._count_up_to(pos, False)

    def allowed(self, b, h, q, k):
        return self._flag(q) | self._flag(k)

    def _tile_any_all(self, first: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        n = self._count_up_to(last, True) - self._count_up_to(first, False)
        return n > 0, n == (last + 1 - first)

    def block_kinds(self, grid, batch, heads):
        q_any, q_all = self._tile_any_all(*grid.query_bounds())
        k_any, k_all = self._tile_any_all(*grid.key_bounds())
        empty = ~q_any & ~k_any
        full = q_all | k_all
        return tile_kinds(empty, full)

    def __repr__(self):
        return f"global_tokens({self.indices.tolist()})"


class BlockSparse(Mask):
    """Block-sparse attention: ``layout[..., q // block_size, k // block_size]`` (positions) says
    whether a whole ``block_size x block_size`` block may attend. ``layout`` is bool,
    ``(nQ, nK)`` or ``(B|1, H|1, nQ, nK)``, covering every query and key position (by default
    ``ceil(Nk / block_size)`` blocks both ways)."""

    work = 3.0  # a lookup in the tile layout

    def __init__(self, layout: Tensor, block_size: int):
        if not isinstance(layout, Tensor) or layout.dtype != torch.bool:
            raise TypeError("block_sparse: layout must be a bool tensor")
        if layout.dim() not in (2, 4):
            raise ValueError(f"block_sparse: layout must be 2-D or 4-D, got shape {tuple(layout.shape)}")
        self.layout = _as_4d(layout)
        self.block_size = positive_int("block_sparse: block_size", block_size)

    def bind(self, batch, heads, nq, nk, device, positions=None):
        pos = _positions(positions, nq, nk)
        lb, lh, lq, lk = self.layout.shape
        if lb not in (1, batch) or lh not in (1, heads):
            raise ValueError(f"block_sparse: layout shape {tuple(self.layout.shape)} does not match "
                             f"batch={batch}, heads={heads}")
        if not pos.explicit:
            need = math.ceil(nk / self.block_size)
            if lq < need or lk < need:
                raise ValueError(f"block_sparse: layout {lq}x{lk} does not cover Nk={nk} positions in "
                                 f"blocks of {self.block_size} ({need}x{need} needed)")
        else:
            q_hi, k_hi = pos.query_span()[1], pos.key_span()[1]
            need_q, need_k = max(q_hi, -1) // self.block_size + 1, max(k_hi, -1) // self.block_size + 1
            if lq < need_q or lk < need_k:
                raise ValueError(f"block_sparse: layout {lq}x{lk} does not cover query positions up to {q_hi} "
                                 f"and key positions up to {k_hi} in blocks of {self.block_size} "
                                 f"({need_q}x{need_k} needed)")
        return self._bound_copy(layout=self.layout.to(device))

    def allowed(self, b, h, q, k):
        lb, lh = self.layout.shape[:2]
        cell = self.layout[_broadcast_index(b, lb), _broadcast_index(h, lh), q.clamp(min=0) // self.block_size,
                           k // self.block_size]
        return cell & (q >= 0)

    def block_kinds(self, grid, batch, heads):
        qf, ql = grid.query_bounds()
        kf, kl = grid.key_bounds()
        bs = self.block_size
        layout = self.layout.to(grid.device)
        # 2-D prefix sums over the layout: count of allowed cells in any rectangle.
        sums = torch.nn.functional.pad(layout.to(torch.int64).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
        r0, r1 = qf.clamp(min=0) // bs, ql.clamp(min=-1) // bs + 1
        c0, c1 = kf // bs, kl // bs + 1
        bi = _table_batch(layout)
        hi = torch.arange(layout.shape[1], device=grid.device).view(1, -1, 1, 1)
        count = sums[bi, hi, r1, c1] - sums[bi, hi, r0, c1] - sums[bi, hi, r1, c0] + sums[bi, hi, r0, c0]
        area = (r1 - r0).clamp(min=0) * (c1 - c0)
        no_negative_rows = qf >= 0  # queries before position 0 see nothing
        return tile_kinds(count == 0, (count == area) & (area > 0) & no_negative_rows)

    def __repr__(self):
        return f"block_sparse(<{tuple(self.layout.shape)} layout>, block_size={self.block_size})"


class TensorMask(Mask):
    """A materialised bool mask, broadcastable to ``(B, H, Nq, Nk)``, indexed by query row and key
    column (not by position)."""

    work = 2.0  # a lookup in the tensor

    def __init__(self, tensor: Tensor):
        if not isinstance(tensor, Tensor) or tensor.dtype != torch.bool:
            raise TypeError("from_tensor: expected a bool tensor (True = may attend)")
        if tensor.dim() > 4:
            raise ValueError(f"mask: expected at most 4 dims (B, H, Nq, Nk), got shape {tuple(tensor.shape)}")
        self.given_shape = tuple(tensor.shape)
        self.tensor = _as_4d(tensor)
        self._positions = None

    def bind(self, batch, heads, nq, nk, device, positions=None):
        expected = (batch, heads, nq, nk)
        for size, want, name in zip(self.tensor.shape, expected, ("batch", "heads", "Nq", "Nk")):
            if size not in (1, want):
                raise ValueError(f"mask: shape {self.given_shape} does not broadcast to "
                                 f"(B, H, Nq, Nk) = {expected} ({name}: {size} vs {want})")
        if device is not None and self.tensor.device != torch.device(device):
            raise ValueError(f"mask: on {self.tensor.device}, but q is on {device}")
        return self._bound_copy(_positions=_positions(positions, nq, nk).to(self.tensor.device))

    def allowed(self, b, h, q, k):
        if self._positions is None:
            raise ValueError(f"{self!r} is not bound to a problem: call mask.bind(batch, heads, nq, nk, device) "
                             "first or pass it to qkv.attention")
        rows, cols = self._positions.query_rows(b, q), self._positions.key_cols(b, k)
        index = [_broadcast_index(i, size) for i, size in zip((b, h, rows, cols), self.tensor.shape)]
        return self.tensor[tuple(index)]

    def block_kinds(self, grid, batch, heads):
        kinds = count_tiles(self.tensor, grid.block_q, grid.block_k).to(grid.device)
        return kinds.expand(-1, -1, grid.num_q_blocks, grid.num_k_blocks)

    def dense(self, batch, heads, nq, nk, device=None, positions=None):
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
        out = self.fn(b, h, q, k)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"from_function({self.name}): fn must return a bool tensor (True = may attend), "
                            f"got {got}; for a float bias pass a float tensor as mask, or use score_mod")
        shape = torch.broadcast_shapes(b.shape, h.shape, q.shape, k.shape)
        try:
            if torch.broadcast_shapes(out.shape, shape) != shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"from_function({self.name}): fn returned shape {tuple(out.shape)}, which does not "
                             f"broadcast to the index tensors' shape {tuple(shape)}") from None
        return out

    def __repr__(self):
        return f"from_function({self.name})"


class _Combined(Mask):
    def __init__(self, *parts: Mask):
        self.parts = parts

    @property
    def work(self) -> float:
        """The parts' work and one operation to combine them."""
        return sum(part.work for part in self.parts) + 1.0

    @property
    def analytic_block_view(self) -> bool:
        return all(p.analytic_block_view for p in self.parts)

    def bind(self, batch, heads, nq, nk, device, positions=None):
        return type(self)(*(bind_mask(p, batch, heads, nq, nk, device, positions) for p in self.parts))


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
    def __invert__(self) -> Mask:
        return self.parts[0]  # ~~m is m: any number of ~ stays one level deep

    def allowed(self, b, h, q, k):
        return ~self.parts[0].allowed(b, h, q, k)

    def block_kinds(self, grid, batch, heads):
        return int(FULL) - self.parts[0].block_kinds(grid, batch, heads)

    def __repr__(self):
        return f"~{self.parts[0]!r}"


class PrefixLM(Mask):
    """Prefix-LM: the keys at positions below ``prefix_len[b]`` are visible to every query, the
    rest causally. A prefix longer than the sequence makes the whole sequence bidirectional."""

    work = 3.0  # k < prefix[b], q >= 0, k <= q

    def __init__(self, prefix_len):
        self.prefix_len = _int_vector("prefix_lm: prefix_len", prefix_len)
        if self.prefix_len.numel() and int(self.prefix_len.min()) < 0:
            raise ValueError(f"prefix_lm: prefix_len must be >= 0, got {self.prefix_len.tolist()}")

    def bind(self, batch, heads, nq, nk, device, positions=None):
        if self.prefix_len.numel() not in (1, batch):
            raise ValueError(f"prefix_lm: prefix_len has {self.prefix_len.numel()} entries, expected 1 or batch={batch}")
        return self._bound_copy(prefix_len=self.prefix_len.to(device))

    def allowed(self, b, h, q, k):
        # Queries at negative positions (Nq > Nk) see nothing, the prefix included.
        return (_in_key_prefix(self.prefix_len, b, k) & (q >= 0)) | (k <= q)

    def block_kinds(self, grid, batch, heads):
        prefix = _key_prefix_kinds(self.prefix_len.to(grid.device), grid)
        qf, ql = grid.query_bounds()
        real_queries = tile_kinds(ql < 0, qf >= 0)  # (B|1, 1, nQB, 1): tiles of negative positions
        return torch.maximum(torch.minimum(prefix, real_queries), Causal().block_kinds(grid, batch, heads))

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
    ``sliding_window(w)`` is causal local attention over the current and ``w`` previous tokens.
    A side wider than ``2**53`` positions is stored as ``2**53`` (the same, for any sequence)."""
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
    """Tokens at ``indices`` (positions) see everything and are seen by everything.
    ``global_tokens([])`` marks no token: alone it hides everything, and ``m | global_tokens([])``
    is ``m``."""
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
    "EMPTY", "PARTIAL", "FULL", "TileKind", "TileGrid", "Mask", "bind_mask",
    "causal", "sliding_window", "key_padding", "document", "prefix_lm", "global_tokens",
    "block_sparse", "from_tensor", "from_function",
]
