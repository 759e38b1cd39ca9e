"""Block layouts: which ``(block_q x block_k)`` tiles of the score matrix a backend must visit.

A :class:`BlockLayout` holds the tile kinds of one problem's mask per batch element and head,
``(B|1, H|1, nQB, nKB)`` int8 on the data's device (a dim of 1: the same for all), and the views
its consumers need, each computed once and kept:

* :meth:`BlockLayout.merged`: ``(nQB, nKB)`` on the CPU, a tile EMPTY (FULL) only if it is so for
  every batch element and head: what a loop over all heads at once (the ``tiled`` backend) walks.
* :meth:`BlockLayout.runs`: the key runs each query tile visits (:func:`plan_runs`), per batch
  element when sequences differ (their own empty tiles are skipped) or merged.
* :meth:`BlockLayout.kv_blocks`: FlexAttention's ``BlockMask.from_kv_blocks`` arguments; also the
  tile list a Triton kernel walks.
* :meth:`BlockLayout.kept`: anything else a backend derives from the layout and the mask it was
  built for (the ``flex`` backend keeps its ``BlockMask`` there), built once per key.

Layouts are cached on the user's mask object (:func:`cached_layout`): a model's layers, which
pass the same mask with the same shapes, build it once.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor


class TileKind(IntEnum):
    """Kind of one tile of a block view: no allowed element, some, or all. Ordered so that ``&``
    of two masks is the ``min`` of their kinds and ``|`` the ``max``."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


EMPTY, PARTIAL, FULL = int(TileKind.EMPTY), int(TileKind.PARTIAL), int(TileKind.FULL)


def merge_kinds(kinds: Tensor) -> Tensor:
    """Reduce ``(..., nQB, nKB)`` tile kinds to ``(nQB, nKB)``: a tile is EMPTY (FULL) only if it
    is EMPTY (FULL) in every leading position, else PARTIAL."""
    flat = kinds.reshape(math.prod(kinds.shape[:-2]), *kinds.shape[-2:])  # (-1 is ambiguous with Nk = 0)
    lo, hi = flat.amin(0), flat.amax(0)
    partial = torch.full_like(lo, PARTIAL)
    return torch.where(hi == EMPTY, torch.full_like(lo, EMPTY), torch.where(lo == FULL, torch.full_like(lo, FULL),
                                                                             partial))


def plan_runs(kinds: Tensor, block_k: int, nk: int, max_run: int) -> list[list[tuple[int, int, bool]]]:
    """Per query tile, the key runs ``(start, end, partial)`` to visit, from ``(nQB, nKB)`` tile
    kinds. Empty tiles are skipped; neighbours of one kind merge into runs of <= ``max_run`` keys."""
    tiles_per_run = max(1, max_run // block_k)
    plan = []
    for row in kinds.tolist():
        runs: list[tuple[int, int, bool]] = []
        j, n = 0, len(row)
        while j < n:
            kind = row[j]
            if kind == EMPTY:
                j += 1
                continue
            end = j + 1
            while end < n and row[end] == kind and end - j < tiles_per_run:
                end += 1
            runs.append((j * block_k, min(end * block_k, nk), kind == PARTIAL))
            j = end
        plan.append(runs)
    return plan


@dataclass(frozen=True)
class KvBlocks:
    """Per query tile, the key tiles to visit, in FlexAttention's ``BlockMask.from_kv_blocks``
    format: ``kv_num_blocks (B|1, H|1, nQB)`` int32 PARTIAL tiles per query tile and
    ``kv_indices (B|1, H|1, nQB, nKB)`` int32 their key-tile indices first (ascending), then
    padding (the other indices); ``full_kv_num_blocks`` / ``full_kv_indices`` the same for FULL
    tiles (no element-wise mask needed there)."""

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor


def _tiles_of_kind(kinds: Tensor, kind: int) -> tuple[Tensor, Tensor]:
    """Count and ascending indices (then the other indices, ascending) of the tiles of ``kind`` in
    each row: a stable partition by two running counts, ``O(tiles)``, no sort and no host sync."""
    wanted = kinds == kind
    cols = torch.arange(kinds.shape[-1], device=kinds.device, dtype=torch.int32)
    before = wanted.cumsum(-1, dtype=torch.int32)  # wanted tiles up to and including each column
    count = before[..., -1:]
    slot = torch.where(wanted, before - 1, count + cols - before)  # the others: after all wanted ones
    order = torch.empty(kinds.shape, dtype=torch.int32, device=kinds.device)
    order.scatter_(-1, slot.long(), cols.expand(kinds.shape))
    return count.squeeze(-1), order


#: Split the tiled walk per batch element when that visits at most this fraction of the tiles the
#: merged walk visits (each batch element then runs its own, smaller, loop).
SPLIT_BATCH_BELOW = 0.75


class BlockLayout:
    """Tile kinds of one problem per batch element and head, and the views consumers need (see
    the module docstring). ``kinds`` is ``(B|1, H|1, nQB, nKB)`` int8 on the data's device."""

    def __init__(self, kinds: Tensor, block_q: int, block_k: int, nq: int, nk: int):
        self.kinds = kinds
        self.block_q, self.block_k, self.nq, self.nk = block_q, block_k, nq, nk
        self._merged: Tensor | None = None
        self._kv_blocks: KvBlocks | None = None
        self._runs: dict = {}
        self._kept: dict = {}

    @staticmethod
    def full(block_q: int, block_k: int, nq: int, nk: int, device=None) -> BlockLayout:
        """Every tile FULL (no mask)."""
        shape = (1, 1, -(-nq // block_q), -(-nk // block_k))
        return BlockLayout(torch.full(shape, FULL, dtype=torch.int8, device=device), block_q, block_k, nq, nk)

    @property
    def num_q_blocks(self) -> int:
        return self.kinds.shape[-2]

    @property
    def num_k_blocks(self) -> int:
        return self.kinds.shape[-1]

    def merged(self) -> Tensor:
        """``(nQB, nKB)`` int8 on the CPU: EMPTY/FULL only where so for every batch element and head."""
        if self._merged is None:
            self._merged = merge_kinds(self.kinds).cpu()
        return self._merged

    def kv_blocks(self) -> KvBlocks:
        """The non-empty key tiles per query tile (see :class:`KvBlocks`), on the data's device."""
        if self._kv_blocks is None:
            partial_n, partial_idx = _tiles_of_kind(self.kinds, PARTIAL)
            full_n, full_idx = _tiles_of_kind(self.kinds, FULL)
            self._kv_blocks = KvBlocks(partial_n, partial_idx, full_n, full_idx)
        return self._kv_blocks

    def kept(self, key, build):
        """``build()``, called once per ``key`` for this layout and kept: for what a backend derives
        from the layout and the mask it belongs to (a layout cached on the user's mask object lives
        as long as that mask, its shapes, positions, device and tables are unchanged)."""
        try:
            return self._kept[key]
        except KeyError:
            value = self._kept[key] = build()
            return value

    def per_batch(self) -> Tensor:
        """``(B|1, nQB, nKB)`` int8 on the CPU: kinds merged over heads only."""
        return torch.stack([merge_kinds(kb) for kb in self.kinds.cpu()])

    def runs(self, max_run: int) -> list[tuple[int, int, list[list[tuple[int, int, bool]]]]]:
        """The walk of a loop over heads: ``[(b0, b1, plan)]``, batch elements ``b0:b1`` visiting
        ``plan`` (:func:`plan_runs`). One group for the whole batch (``b1 = None``) unless walking
        each batch element on its own visits at most :data:`SPLIT_BATCH_BELOW` of the tiles."""
        if max_run not in self._runs:
            merged = self.merged()
            groups = [(0, None, plan_runs(merged, self.block_k, self.nk, max_run))]
            if self.kinds.shape[0] > 1:
                per_batch = self.per_batch()
                own = int((per_batch != EMPTY).sum())
                if own <= SPLIT_BATCH_BELOW * per_batch.shape[0] * int((merged != EMPTY).sum()):
                    groups = [(b, b + 1, plan_runs(kb, self.block_k, self.nk, max_run))
                              for b, kb in enumerate(per_batch)]
            self._runs[max_run] = groups
        return self._runs[max_run]

    def visited_tiles(self, max_run: int) -> int:
        """Tiles a loop over heads visits (summed over batch groups, each counted once per
        batch element it covers): the figure that the per-batch split lowers."""
        total = 0
        for b0, b1, plan in self.runs(max_run):
            count = (self.kinds.shape[0] if b1 is None else b1 - b0)
            tiles = sum(-(-(c1 - c0) // self.block_k) for runs in plan for c0, c1, _ in runs)
            total += count * tiles
        return total

    def __repr__(self):
        return (f"BlockLayout(kinds {tuple(self.kinds.shape)} on {self.kinds.device}, "
                f"tiles {self.block_q}x{self.block_k})")


# --------------------------------------------------------------------------------------------
# The cache on the user's mask object
# --------------------------------------------------------------------------------------------

#: Entries kept per mask object and cache (the most recent shapes).
CACHE_SIZE = 8
#: The caches qkv keeps on a user's mask object: block layouts, and the dispatcher's choices.
OWNER_CACHES = ("_qkv_layouts", "_qkv_choices")


def tensor_state(obj, depth: int = 0) -> tuple:
    """Identity and version of every tensor a mask holds (its tables): a table changed in place
    is a different mask."""
    state = []
    for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if name in OWNER_CACHES:
            continue
        if isinstance(value, Tensor):
            state.append((id(value), value._version))
        elif depth < 4 and hasattr(value, "__dict__") and not callable(value):
            state.extend(tensor_state(value, depth + 1))
        elif depth < 4 and isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, Tensor):
                    state.append((id(item), item._version))
                elif hasattr(item, "__dict__"):
                    state.extend(tensor_state(item, depth + 1))
    return tuple(state)


def owner_cache(owner, name: str) -> dict | None:
    """The cache ``name`` (one of :data:`OWNER_CACHES`) kept on ``owner``, the user's mask object,
    made on first use; None for an owner that cannot hold attributes (nothing is cached then)."""
    cache = getattr(owner, name, None)
    if cache is None:
        cache = {}
        try:
            object.__setattr__(owner, name, cache)
        except (AttributeError, TypeError):
            return None
    return cache


def keep(cache: dict, key, value) -> None:
    """Store ``value`` under ``key`` as the most recent entry of an owner cache, dropping the
    oldest beyond :data:`CACHE_SIZE`."""
    cache.pop(key, None)
    while len(cache) >= CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value


def cached_layout(owner, key: tuple, build, state: tuple) -> BlockLayout:
    """The layout for ``key`` cached on ``owner`` (the user's mask object), built by ``build()``
    on a miss. ``key`` holds the shapes, tile sizes, positions and device; ``state``, the
    owner's :func:`tensor_state`, is added, so that a table changed in place is never served
    stale. An owner that cannot hold attributes is not cached."""
    cache = owner_cache(owner, "_qkv_layouts")
    if cache is None:
        return build()
    full_key = (*key, state)
    layout = cache.get(full_key)
    if layout is None:
        layout = build()
    keep(cache, full_key, layout)  # most recent last
    return layout


__all__ = ["TileKind", "BlockLayout", "KvBlocks", "plan_runs", "merge_kinds", "cached_layout", "tensor_state",
           "owner_cache", "keep", "OWNER_CACHES", "CACHE_SIZE"]
