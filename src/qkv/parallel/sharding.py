"""Which positions of a sequence each rank holds: the two sequence layouts of ring attention.

A sequence of ``N`` positions is split across ``W`` ranks:

- ``"contiguous"``: rank ``r`` holds the ``r``-th of ``W`` consecutive chunks. Simple, but under a
  causal mask the last rank has the most work (its queries see every earlier key) and rank 0 the
  least.
- ``"zigzag"``: the sequence is cut into ``2W`` chunks and rank ``r`` holds chunks ``r`` and
  ``2W - 1 - r`` (one early, one late), so causal work is the same on every rank.

Chunks follow :func:`torch.tensor_split`: when ``N`` does not divide evenly the first chunks are
one position longer. A rank's local tensor is its chunks concatenated in position order.

Ring attention (:func:`qkv.parallel.ring_attention`) also accepts contiguous shards of any sizes
(each rank passes whatever it holds, in rank order); zigzag shards must follow the chunking above.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag")

#: A run of consecutive positions ``start ..< stop`` held by one rank.
Piece = tuple[int, int]


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")
    return layout


def chunk_bounds(length: int, parts: int) -> list[Piece]:
    """``parts`` consecutive chunks of ``0 ..< length``, as :func:`torch.tensor_split` cuts them."""
    size, extra = divmod(length, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_pieces(length: int, world_size: int, rank: int, layout: str = "contiguous") -> list[Piece]:
    """The runs of positions rank ``rank`` of ``world_size`` holds, in local order (one run for
    ``"contiguous"``, two for ``"zigzag"``)."""
    check_layout(layout)
    _check_rank(rank, world_size)
    if layout == "contiguous":
        return [chunk_bounds(length, world_size)[rank]]
    chunks = chunk_bounds(length, 2 * world_size)
    return [chunks[rank], chunks[2 * world_size - 1 - rank]]


def pieces_from_lengths(lengths: list[int], layout: str) -> list[list[Piece]]:
    """Every rank's pieces from every rank's local length (what ring attention gathers).

    Contiguous shards may have any lengths (rank order is position order); zigzag shards must be
    the ones :func:`shard_pieces` cuts from the total, else ``ValueError``."""
    world = len(lengths)
    total = sum(lengths)
    if layout == "contiguous":
        pieces, start = [], 0
        for n in lengths:
            pieces.append([(start, start + n)])
            start += n
        return pieces
    pieces = [shard_pieces(total, world, r, "zigzag") for r in range(world)]
    expected = [sum(b - a for a, b in p) for p in pieces]
    if expected != list(lengths):
        raise ValueError(f"layout='zigzag': local sequence lengths {list(lengths)} are not the zigzag shards of "
                         f"a sequence of {total} positions over {world} ranks (expected {expected}); "
                         "cut them with qkv.parallel.shard_sequence")
    return pieces


def shard_positions(length: int, world_size: int, rank: int, layout: str = "contiguous", device=None) -> Tensor:
    """Global positions ``(n_local,)`` int64 of the rank's shard in local order (for RoPE, masks)."""
    runs = [torch.arange(a, b, device=device) for a, b in shard_pieces(length, world_size, rank, layout)]
    return torch.cat(runs)


def shard_sequence(x: Tensor, layout: str = "contiguous", *, rank: int | None = None,
                   world_size: int | None = None, group=None, dim: int = 2) -> Tensor:
    """This rank's shard of the whole sequence ``x`` (positions along ``dim``; ``(B, H, N, D)``
    by default), contiguous. ``rank``/``world_size`` default to the process group's."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rank, world_size = _rank_and_world(rank, world_size, group)
    dim = _check_dim(x, dim)
    parts = [x.narrow(dim, a, b - a) for a, b in shard_pieces(x.shape[dim], world_size, rank, layout)]
    return torch.cat(parts, dim=dim).contiguous()


def unshard_sequence(shards: list[Tensor], layout: str = "contiguous", *, dim: int = 2) -> Tensor:
    """The whole sequence from every rank's shard (``shards[r]`` from rank ``r``), on one process."""
    check_layout(layout)
    if not shards:
        raise ValueError("shards must hold one tensor per rank, got none")
    dim = _check_dim(shards[0], dim)
    lengths = [s.shape[dim] for s in shards]
    pieces = pieces_from_lengths(lengths, layout)
    located = []
    for shard, runs in zip(shards, pieces):
        offset = 0
        for a, b in runs:
            located.append((a, shard.narrow(dim, offset, b - a)))
            offset += b - a
    return torch.cat([t for _, t in sorted(located, key=lambda item: item[0])], dim=dim)


def gather_sequence(local: Tensor, layout: str = "contiguous", *, group=None, dim: int = 2) -> Tensor:
    """The whole sequence on every rank of ``group`` from each rank's ``local`` shard
    (an all-gather; shards may differ in length along ``dim``). Not differentiable."""
    dim = _check_dim(local, dim)
    world = dist.get_world_size(group)
    n = torch.tensor([local.shape[dim]], dtype=torch.int64, device=local.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    pad = list(local.shape)
    pad[dim] = longest - local.shape[dim]
    padded = torch.cat([local, local.new_zeros(pad)], dim=dim).contiguous()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return unshard_sequence([g.narrow(dim, 0, m) for g, m in zip(gathered, lengths)], layout, dim=dim)


def _check_rank(rank: int, world_size: int) -> None:
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")


def _check_dim(x: Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _rank_and_world(rank, world_size, group) -> tuple[int, int]:
    if rank is None or world_size is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("pass rank and world_size, or initialise torch.distributed first")
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    _check_rank(rank, world_size)
    return rank, world_size
