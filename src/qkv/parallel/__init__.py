"""qkv.parallel: attention over a sequence sharded across processes (torch.distributed).

:func:`ring_attention` is exact attention when one device cannot hold the whole sequence: each
rank keeps its shard of queries, keys and values, and K/V shards travel round a ring of ranks
(see ``docs/parallel.md``). The sharding helpers cut a sequence into either layout and put it back.
"""

from .plan import RingPlan, build_plan
from .ring import RingStats, ring_attention
from .sharding import (LAYOUTS, chunk_bounds, gather_sequence, shard_pieces, shard_positions, shard_sequence,
                       unshard_sequence)

__all__ = [
    "ring_attention", "RingStats", "RingPlan", "build_plan", "LAYOUTS", "chunk_bounds", "shard_pieces",
    "shard_positions", "shard_sequence", "unshard_sequence", "gather_sequence",
]
