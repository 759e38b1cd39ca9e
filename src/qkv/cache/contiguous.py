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
from . import base
from .base import CacheFullError, token_counts, KVCacheBase, Step, appending_step, put_tokens, uniform_step


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
        self._uniform: int | None = 0  # the common length while all rows have one (host-side, no tensor read)
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
        self._uniform = 0
        self._step = None

    def uniform_length(self) -> int | None:
        return self._uniform

    def plan_uniform(self, n: int, start: int) -> Step:
        if start + n > self.capacity:
            raise CacheFullError(f"KVCache: capacity {self.capacity} exceeded: sequence(s) "
                                 f"{list(range(self.batch_size))} hold {[start] * self.batch_size} tokens and this "
                                 f"step adds {[n] * self.batch_size}; nothing was written")
        self._nk = start + n
        return uniform_step(start, n, self.batch_size, self.device)

    def plan(self, n: int, counts: Tensor) -> Step:
        new_lengths = self._lengths + counts
        if int(new_lengths.max()) > self.capacity:
            rows = (new_lengths > self.capacity).nonzero().flatten().tolist()
            raise CacheFullError(f"KVCache: capacity {self.capacity} exceeded: sequence(s) {rows} hold "
                                 f"{self._lengths[rows].tolist()} tokens and this step adds {counts[rows].tolist()}; "
                                 "nothing was written")
        self._nk = min(self.capacity, int(self._lengths.max()) + n)
        return appending_step(self._lengths, counts, n, self._nk, self.device)

    def advance(self, counts: Tensor) -> None:
        """Record that rows grew by ``counts (B,)`` tokens written into :attr:`k`, :attr:`v` directly
        (by a fixed-shape :class:`~qkv.nn.compiled.DecodeStep`), at slots ``lengths[b] ..``."""
        counts = token_counts(counts, name="counts", batch_size=self.batch_size, num_tokens=self.capacity)
        if int((self._lengths + counts).max()) > self.capacity:
            raise CacheFullError(f"KVCache: capacity {self.capacity} exceeded by advance({counts.tolist()}) from "
                                 f"lengths {self._lengths.tolist()}")
        self._lengths += counts
        self._uniform = int(self._lengths[0]) if bool((self._lengths == self._lengths[0]).all()) else None

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        where = self._step.new_columns
        keys, values = self._layer_buffers(layer)
        if type(where) is slice:  # the uniform hot path: the same columns in every row
            keys[:, :, where] = k
            values[:, :, where] = v
        else:
            put_tokens(keys, k, where)  # buffer column = slot = position
            put_tokens(values, v, where)
        return keys[:, :, :self._nk], values[:, :, :self._nk]

    def _layer_buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        """``k[layer], v[layer]``, as views made once (indexing costs an op per call)."""
        views = self.__dict__.get("_views")
        if views is None or views[0] is not self.k or views[1] is not self.v:
            views = self._views = (self.k, self.v, self.k.unbind(0), self.v.unbind(0))
        return views[2][layer], views[3][layer]

    def finish(self, step: Step) -> None:
        if step.offset is not None:  # uniform: every row grew by n (no tensor read)
            self._lengths += step.n
            self._uniform = step.offset + step.n
        else:
            self._lengths += step.counts
            self._uniform = int(self._lengths[0]) if bool((self._lengths == self._lengths[0]).all()) else None
        if base.DEBUG:
            expected = int(self._lengths[0]) if bool((self._lengths == self._lengths[0]).all()) else None
            assert self._uniform == expected, (self._uniform, self._lengths)

    def __repr__(self):
        return (f"KVCache(layers={self.num_layers}, batch={self.batch_size}, capacity={self.capacity}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, lengths={self._lengths.tolist()})")
