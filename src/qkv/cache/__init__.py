"""KV caches for decoding: keys and values of past tokens, kept so that each new token costs
``O(context)`` instead of recomputing the whole sequence.

- :class:`KVCache`: preallocated, contiguous; a batch of sequences of different lengths.
- :class:`PagedKVCache`: pages from a shared pool, block tables, fork with copy-on-write, free.
- :class:`StreamingKVCache`: attention sinks plus a sliding window, bounded memory forever.

All serve :class:`qkv.nn.MultiHeadAttention` through the step protocol of
:mod:`qkv.cache.base` (``begin`` / ``layer(i).update`` / ``commit``), which
:class:`qkv.nn.Decoder` drives. Running out of room raises :class:`CacheFullError` before anything
is written. A batch whose rows share one length takes a hot path (no index tensors, no reads back
from the device, layout checked once per step by the model; :func:`set_debug` checks every layer);
ragged steps pass each row's position to :func:`qkv.attention` as ``q_offset``. Caches are for inference: they store keys and values detached, so gradients do not flow
into cached keys and values (a step's own new ones stay differentiable within the step).
"""

from .base import CacheFullError, CacheLayer, KVCacheBase, set_debug
from .contiguous import KVCache
from .paged import PagedBatch, PagedKVCache
from .positions import PositionMask
from .streaming import StreamingKVCache

__all__ = ["KVCache", "PagedKVCache", "PagedBatch", "StreamingKVCache", "CacheFullError", "CacheLayer",
           "KVCacheBase", "PositionMask", "set_debug"]
