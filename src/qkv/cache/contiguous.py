"""A preallocated KV cache: per layer, ``(B, Hkv, capacity, D)`` keys and values.

Sequence ``b`` holds ``lengths[b]`` tokens in slots ``0 .. lengths[b]-1`` (slot = position); the
sequences of a batch may differ in length. A step writes the new tokens of row ``b`` at slots
``lengths[b] ..`` and attends over slots ``0 .. max(lengths) + n - 1``, a view of the buffer (no
copy). When all rows have the same length the mask is plain :func:`qkv.causal` (none at all for
one new token), which the fused backends run fastest; otherwise it is a
:class:`~qkv.cache.positions.PositionMask` over each row's own positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..validate import positive_int
from .base import CacheFullError, KVCacheBase, Step, appending_step, put_tokens


class KVCache(KVCacheBase):
    """Contiguous KV cache for ``num_layers`` layers and a batch of ``batch_size`` sequences.

    Args:
        num_layers: attention layers served (``cache.layer(i)`` for ``i < num_layers``).
        batch_size: sequences ``B``.
        capacity: tokens each sequence can hold.
        num_kv_heads, head_dim: the key/value shape per token ``(Hkv, D)``.
        dtype, device: of the stored keys and values (they must match the model's).

    Attributes:
        k, v: ``(num_layers, B, Hkv, capacity, D)``; slots at or beyond ``lengths[b]`` hold no
            token of sequence ``b``. They hold detached values: gradients do not flow into cached
            keys and values (see :mod:`qkv.cache.base`).
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, device)
        positive_int("batch_size", batch_size)
        self.capacity = positive_int("capacity", capacity)
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self._lengths = torch.zeros(batch_size, dtype=torch.int64)
        self._nk = 0  # key columns the current step reads

    @property
    def batch_size(self) -> int:
        return self._lengths.shape[0]

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` tokens held per sequence (int64, CPU; a copy)."""
        return self._lengths.clone()

    def reset(self) -> None:
        """Forget every sequence (lengths back to 0)."""
        self._lengths.zero_()
        self._step = None

    def plan(self, n: int, counts: Tensor) -> Step:
        new_lengths = self._lengths + counts
        if int(new_lengths.max()) > self.capacity:
            rows = (new_lengths > self.capacity).nonzero().flatten().tolist()
            raise CacheFullError(f"KVCache: capacity {self.capacity} exceeded: sequence(s) {rows} hold "
                                 f"{self._lengths[rows].tolist()} tokens and this step adds {counts[rows].tolist()}; "
                                 "nothing was written")
        self._nk = min(self.capacity, int(self._lengths.max()) + n)
        return appending_step(self._lengths, counts, n, self._nk, self.device)

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        put_tokens(self.k[layer], k, self.step.new_columns)  # buffer column = slot = position
        put_tokens(self.v[layer], v, self.step.new_columns)
        return self.k[layer, :, :, :self._nk], self.v[layer, :, :, :self._nk]

    def finish(self, step: Step) -> None:
        self._lengths += step.counts

    def __repr__(self):
        return (f"KVCache(layers={self.num_layers}, batch={self.batch_size}, capacity={self.capacity}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, lengths={self._lengths.tolist()})")
