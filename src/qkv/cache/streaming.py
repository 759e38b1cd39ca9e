"""A streaming KV cache: the first few tokens (attention sinks) plus a sliding window, bounded memory.

StreamingLLM (Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks")
observed that a model attending over a sliding window collapses once the first tokens leave the
window, because softmax parks surplus attention on them, and that keeping those few "sink" tokens
restores it. This cache holds ``sinks + window`` tokens per sequence and layer, however long
generation runs: each query sees the tokens at positions ``< sinks`` and the ``window`` tokens
before it, and itself, which equals a full forward pass under the mask
``causal & (sliding window | first sinks keys)``.

The window is a ring buffer; each slot remembers the position of the token it holds, and a
:class:`~qkv.cache.positions.PositionMask` applies the rule above to those positions. Keys keep the
rotary angles of their original positions (StreamingLLM instead re-rotates keys to their slot
index; that variant is not implemented here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..validate import positive_int
from .base import KVCacheBase, Step, real_tokens, uniform_step
from .positions import PositionMask


class StreamingKVCache(KVCacheBase):
    """Sink tokens plus a sliding window, per layer and sequence.

    Args:
        num_layers, batch_size, num_kv_heads, head_dim, dtype, device: as for :class:`~qkv.cache.KVCache`.
        sinks: how many first tokens are kept forever (``>= 0``; StreamingLLM uses 4).
        window: how many most recent tokens are kept besides the sinks (``>= 1``).

    Attributes:
        k, v: ``(num_layers, B, Hkv, sinks + window, D)``, detached values: gradients do not flow
            into cached keys and values (see :mod:`qkv.cache.base`).
        slot_positions: ``(B, sinks + window)`` int64, the position held in each slot (-1 = empty).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, *, sinks: int = 4,
                 window: int = 1024, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(num_layers, num_kv_heads, head_dim, dtype, device)
        positive_int("batch_size", batch_size)
        positive_int("window", window)
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
        self.sinks, self.window = sinks, window
        shape = (num_layers, batch_size, num_kv_heads, sinks + window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.slot_positions = torch.full((batch_size, sinks + window), -1, dtype=torch.int64, device=self.device)
        self._lengths = torch.zeros(batch_size, dtype=torch.int64)
        self._uniform: int | None = 0  # the common length while all rows have one (host-side)
        self._staged: dict[int, tuple[Tensor, Tensor]] = {}
        self._one_slot: int | None = None  # the slot of the uniform hot path's single new token

    @property
    def batch_size(self) -> int:
        return self._lengths.shape[0]

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` tokens seen per sequence so far (int64, CPU), not all of them still held."""
        return self._lengths.clone()

    def uniform_length(self) -> int | None:
        return self._uniform

    def slot(self, position: int) -> int:
        """The slot that holds the token at ``position`` (sinks first, then the ring)."""
        return position if position < self.sinks else self.sinks + (position - self.sinks) % self.window

    def plan_uniform(self, n: int, start: int) -> Step:
        """One new token at position ``start`` in every row: it sees every token held (the sinks
        and the ``window`` before it), so no mask. Until the ring first fills, slot = position and
        the keys are in position order; after, a :class:`PositionMask` is built only if a score
        modifier needs the true positions."""
        if n > 1:
            return super().plan_uniform(n, start)
        held = self.sinks + self.window
        self._staged = {}
        self._one_slot = self.slot(start)
        self._read = min(start, held)
        if start <= held:  # keys 0 .. start-1 at slots 0 .. start-1, then the new one: bottom-right aligned
            step = uniform_step(start, 1, self.batch_size, self.device)
            step.new_columns = slice(start, start + 1)
            return step

        def position_mask():
            positions = torch.full((self.batch_size, 1), start, dtype=torch.int64, device=self.device)
            return PositionMask(positions, torch.cat((self.slot_positions, positions), dim=1),
                                window=self.window, sinks=self.sinks)

        return Step(n=1, batch=self.batch_size, device=self.device, end=start + 1, mask=None, true_positions=True,
                    new_columns=slice(held, held + 1), offset=start, position_mask=position_mask)

    def plan(self, n: int, counts: Tensor) -> Step:
        positions = self._lengths.to(self.device)[:, None] + torch.arange(n, device=self.device)
        k_positions = torch.cat((self.slot_positions, positions), dim=1)
        mask = PositionMask(positions, k_positions, window=self.window, sinks=self.sinks)
        # Of each row's new tokens keep the sinks and the last `window`; their slots are distinct.
        rows, tokens = real_tokens(counts)
        position = self._lengths[rows] + tokens
        keep = (position < self.sinks) | (tokens >= counts[rows] - self.window)
        rows, tokens, position = rows[keep], tokens[keep], position[keep]
        slots = torch.where(position < self.sinks, position, self.sinks + (position - self.sinks) % self.window)
        self._keep = tuple(t.to(self.device) for t in (rows, slots, tokens))
        self._staged = {}
        self._one_slot = None
        self._read = None
        held = self.sinks + self.window  # this step's tokens follow the held ones in what update returns
        return Step(n=n, batch=self.batch_size, device=self.device, end=int(self._lengths.max()) + n, mask=mask,
                    true_positions=True, new_columns=slice(held, held + n), positions=positions, counts=counts)

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._staged[layer] = (k, v)  # written at commit: this step's queries still need what they evict
        keys, values = self.k[layer], self.v[layer]
        if self._read is not None:
            keys, values = keys[:, :, :self._read], values[:, :, :self._read]
        return torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2)

    def finish(self, step: Step) -> None:
        if self._one_slot is not None:
            slot = self._one_slot
            for layer, (k, v) in self._staged.items():
                self.k[layer][:, :, slot] = k[:, :, 0]
                self.v[layer][:, :, slot] = v[:, :, 0]
            self.slot_positions[:, slot] = step.offset
            self._lengths += 1
            self._uniform = step.offset + 1
        else:
            rows, slots, tokens = self._keep
            for layer, (k, v) in self._staged.items():
                self.k[layer][rows, :, slots] = k[rows, :, tokens]
                self.v[layer][rows, :, slots] = v[rows, :, tokens]
            self.slot_positions[rows, slots] = step.positions[rows, tokens]
            self._lengths += step.counts
            self._uniform = int(self._lengths[0]) if bool((self._lengths == self._lengths[0]).all()) else None
        self._staged = {}

    def __repr__(self):
        return (f"StreamingKVCache(layers={self.num_layers}, batch={self.batch_size}, sinks={self.sinks}, "
                f"window={self.window}, seen={self._lengths.tolist()})")
