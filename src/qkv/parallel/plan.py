"""The ring schedule: which blocks each rank computes, and how far each K/V shard travels.

Every rank builds the same :class:`RingPlan` from the same facts (every rank's pieces and the
mask), so all ranks agree on who sends what at which step without exchanging a word about it.

At step ``s`` rank ``r`` holds the K/V shard of rank ``(r - s) mod W``. Shard ``j`` travels the
ring ``j -> j+1 -> ...`` only as far as the farthest rank whose queries see any of its keys
(``reach[j]`` hops); beyond that it is not sent. A rank that holds a shard but whose blocks with it
are all empty under the mask computes nothing at that step (it only relays). The ring stops after
``max(reach)`` steps: for a sliding window narrower than a shard that is one hop, whatever ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sharding import Piece


@dataclass(frozen=True)
class RingPlan:
    """``pieces[r]``: rank ``r``'s runs of positions (local order); ``blocks[r][j]``: the
    ``(query piece, key piece)`` index pairs of rank ``r``'s queries x shard ``j``'s keys that are
    not empty under the mask; ``reach[j]``: ring hops shard ``j`` travels."""

    pieces: tuple[tuple[Piece, ...], ...]
    blocks: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]
    reach: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.pieces)

    @property
    def steps(self) -> int:
        """Ring steps run, the local step 0 included."""
        return 1 + max(self.reach)

    def shard(self, rank: int, step: int) -> int:
        """The rank whose K/V shard ``rank`` holds at ``step``."""
        return (rank - step) % self.world_size

    def holds(self, rank: int, step: int) -> bool:
        """Whether the shard of ``(rank - step)`` reaches ``rank`` (step 0: its own)."""
        return step < self.world_size and self.reach[self.shard(rank, step)] >= step

    def forwards(self, rank: int, step: int) -> bool:
        """Whether ``rank`` sends the shard it holds at ``step`` on to ``rank + 1``."""
        return self.holds(rank, step) and self.reach[self.shard(rank, step)] >= step + 1

    def computes(self, rank: int, step: int) -> bool:
        return self.holds(rank, step) and bool(self.blocks[rank][self.shard(rank, step)])

    def lengths(self) -> list[int]:
        return [sum(b - a for a, b in p) for p in self.pieces]

    def summary(self) -> dict:
        """Counts for benchmarks and docs: steps run, and the (rank, step) slots of a full
        ``W``-step ring that were computed, skipped (shard in hand, nothing to do) or never sent."""
        w = self.world_size
        slots = [(r, s) for r in range(w) for s in range(w)]
        computed = sum(self.computes(r, s) for r, s in slots)
        held = sum(self.holds(r, s) for r, s in slots)
        return {"world_size": w, "steps": self.steps, "full_ring_steps": w, "blocks_computed": computed,
                "blocks_skipped_in_hand": held - computed, "shards_never_sent": len(slots) - held,
                "reach": list(self.reach)}


def build_plan(pieces: list[list[Piece]], is_empty) -> RingPlan:
    """The plan for ``pieces`` (per rank) under ``is_empty(q0, q1, k0, k1) -> bool`` (no query in
    positions ``q0 ..< q1`` sees a key in ``k0 ..< k1``)."""
    w = len(pieces)
    blocks = []
    for r in range(w):
        row = []
        for j in range(w):
            row.append(tuple((a, c) for a, (q0, q1) in enumerate(pieces[r]) for c, (k0, k1) in enumerate(pieces[j])
                             if not is_empty(q0, q1, k0, k1)))
        blocks.append(tuple(row))
    reach = tuple(max([d for d in range(w) if blocks[(j + d) % w][j]], default=0) for j in range(w))
    return RingPlan(tuple(tuple(p) for p in pieces), tuple(blocks), reach)
