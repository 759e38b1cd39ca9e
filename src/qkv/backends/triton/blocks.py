"""The tile lists the kernels walk, in FlexAttention's format, and bit-packed partial tiles.

For a ``(block_q x block_k)`` tiling and tile kinds ``(B|1, H|1, nQB, nKB)`` (EMPTY/PARTIAL/FULL
per batch element and head, from the problem's block layout), the kernels walk, per query tile,
the key tiles to visit (:func:`query_lists`, the layout's ``kv_blocks()``):
``kv_num_blocks (B|1, H|1, nQB)`` int32 and ``kv_indices (B|1, H|1, nQB, nKB)`` int32 for the
PARTIAL tiles (ascending, then padding), and ``full_kv_num_blocks`` / ``full_kv_indices`` for the
FULL ones: exactly the arguments of FlexAttention's ``BlockMask.from_kv_blocks``. :func:`kv_lists`
on the transposed kinds gives, per key tile, the query tiles (the dk/dv kernel's walk).

A mask the kernels cannot evaluate is copied bit-packed, partial tiles only
(:func:`pack_partial_tiles`): memory grows with the partial tiles, not with ``Nq * Nk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...masks import FULL, PARTIAL
from ...problem import Problem


def positions(problem: Problem) -> tuple[Tensor, Tensor]:
    """``(B,)`` int32 positions of query row 0 and key column 0 per batch element (the problem's
    ``q_offset`` / ``k_offset``: key column ``j`` of batch ``b`` is at ``k_offset[b] + j``)."""
    p = problem
    # An int becomes a fill on the device (no host-to-device copy, which would wait for the device
    # and could not be captured in a CUDA graph); a tensor offset is already there.
    return tuple(torch.full((p.batch,), x, dtype=torch.int32, device=p.device) if isinstance(x, int)
                 else x.to(device=p.device, dtype=torch.int32).expand(p.batch).contiguous()
                 for x in (p.q_offset, p.k_offset))


def tile_kinds(problem: Problem, block_q: int, block_k: int) -> Tensor:
    """``(B|1, H|1, nQB, nKB)`` int8 tile kinds of ``problem``'s mask on its device (core's
    :class:`~qkv.layout.BlockLayout`, cached on the user's mask across calls)."""
    return problem.layout(block_q, block_k).kinds.to(problem.index_device)


@dataclass
class TileLists:
    """Per row tile: the column tiles of one kind to visit (see module docstring)."""

    num_blocks: Tensor       # (B|1, H|1, rows) int32
    indices: Tensor          # (B|1, H|1, rows, cols) int32
    full_num_blocks: Tensor
    full_indices: Tensor


def _list_of(selected: Tensor) -> tuple[Tensor, Tensor]:
    cols = selected.shape[-1]
    order = torch.arange(cols, device=selected.device, dtype=torch.int32)
    key = torch.where(selected, order, order + cols)
    indices = key.argsort(dim=-1, stable=True).to(torch.int32).contiguous()
    return selected.sum(-1, dtype=torch.int32).contiguous(), indices


def kv_lists(kinds: Tensor) -> TileLists:
    """Lists over the last dim of ``kinds (B|1, H|1, R, C)``: partial tiles, then full tiles."""
    n, idx = _list_of(kinds == PARTIAL)
    fn, fidx = _list_of(kinds == FULL)
    return TileLists(n, idx, fn, fidx)


def query_lists(problem: Problem, block_q: int, block_k: int) -> TileLists:
    """The key tiles per query tile: the layout's ``kv_blocks()`` (FlexAttention's format)."""
    kv = problem.layout(block_q, block_k).kv_blocks()
    return TileLists(*(t.to(problem.index_device).contiguous() for t in (
        kv.kv_num_blocks, kv.kv_indices, kv.full_kv_num_blocks, kv.full_kv_indices)))


def expanded_strides(t: Tensor, batch: int, heads: int) -> tuple[int, int]:
    """Batch and head strides of ``t (B|1, H|1, ...)`` seen as ``(batch, heads, ...)`` (0 where broadcast)."""
    e = t.expand(batch, heads, *t.shape[2:])
    return e.stride(0), e.stride(1)


def pack_partial_tiles(problem: Problem, kinds: Tensor, block_q: int, block_k: int) -> tuple[Tensor, Tensor]:
    """Bit-packed copy of the mask on its partial tiles.

    Returns ``tile_map (B|1, H|1, nQB, nKB)`` int32 (index of each partial tile, -1 elsewhere) and
    ``bits (P, block_q, block_k // 8)`` uint8 (bit ``c % 8`` of byte ``c // 8`` is column ``c``).
    Positions outside the problem are False."""
    if block_k % 8:
        raise ValueError(f"block_k must be a multiple of 8 for bit-packed masks, got {block_k}")
    dev = problem.index_device
    partial = kinds == PARTIAL
    tile_map = torch.full(kinds.shape, -1, dtype=torch.int32, device=dev)
    where = partial.nonzero()
    count = where.shape[0]
    tile_map[partial] = torch.arange(count, dtype=torch.int32, device=dev)
    bits = torch.zeros(max(count, 1), block_q, block_k // 8, dtype=torch.uint8, device=dev)
    q_off, k_off = (x.to(torch.int64) for x in positions(problem))
    r = torch.arange(block_q, device=dev).view(1, -1, 1)
    c = torch.arange(block_k, device=dev).view(1, 1, -1)
    weights = (1 << torch.arange(8, device=dev, dtype=torch.int32)).view(1, 1, 1, 8)
    chunk = max(1, (1 << 22) // (block_q * block_k))
    for s in range(0, count, chunk):
        w = where[s:s + chunk]
        b, h = w[:, 0].view(-1, 1, 1), w[:, 1].view(-1, 1, 1)
        rows = w[:, 2].view(-1, 1, 1) * block_q + r
        cols = w[:, 3].view(-1, 1, 1) * block_k + c
        inside = (rows < problem.nq) & (cols < problem.nk)
        q_pos = rows.clamp(max=problem.nq - 1) + q_off[w[:, 0]].view(-1, 1, 1)
        k_pos = cols.clamp(max=problem.nk - 1) + k_off[w[:, 0]].view(-1, 1, 1)
        allowed = problem.mask.allowed(b, h, q_pos, k_pos)
        allowed = torch.broadcast_to(allowed, inside.shape) & inside
        packed = (allowed.view(*allowed.shape[:2], block_k // 8, 8).to(torch.int32) * weights).sum(-1)
        bits[s:s + chunk] = packed.to(torch.uint8)
    return tile_map.contiguous(), bits.contiguous()
