"""A decoding step at fixed shapes, which ``torch.compile(fullgraph=True)`` captures whole.

An eager step of :class:`~qkv.nn.Decoder` attends over exactly the tokens cached so far, so its
shapes grow by one every token, and its cache bookkeeping runs on the host. :class:`DecodeStep`
instead runs one new token per row over *all* ``capacity`` slots of a :class:`~qkv.cache.KVCache`,
with a bool key mask that hides the slots beyond each row's position: every step has the same
shapes, no host sync and no Python-level state change, so it compiles once and, on CUDA, can be
captured in a CUDA graph (``mode="reduce-overhead"``). The new keys and values are scattered into
the cache's buffers at each row's position (rows may differ in length), and the RoPE rotation is
looked up from the model's cos/sin table by position.

The modules are the model's own (blocks, attention, norms); only the cache layer differs
(:class:`StaticCacheLayer`). Attention runs with ``backend="sdpa"``: torch's fused kernel is what
compiles and replays in a CUDA graph (the dispatcher's estimates are for eager kernels, and its
Python does not trace); ``qkv.explain_dispatch(..., backend="sdpa")`` shows the same choice. The step attends over ``capacity`` keys instead of the filled ones,
which costs ``O(capacity)`` per step: size the cache to the generation (as ``generate`` does).
``Decoder.generate(..., compile=True)`` prefills eagerly, then decodes with a compiled step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .positional import LearnedPositionalEmbedding, Rotation, SinusoidalEmbedding


class StaticCacheLayer:
    """One layer of a :class:`~qkv.cache.KVCache` as a fixed-shape step sees it: the interface
    :class:`~qkv.nn.MultiHeadAttention` uses (``update``, ``remap_score_mod``). Made afresh inside
    each step (no state outlives it, so a compiled step has no Python side effects to replay)."""

    def __init__(self, keys: Tensor, values: Tensor, rows: Tensor, positions: Tensor, key_mask: Tensor):
        self.keys, self.values, self.rows, self.positions, self.key_mask = keys, values, rows, positions, key_mask

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write ``k, v (B, Hkv, 1, D)`` at each row's position; return all ``capacity`` keys and
        values and the key mask ``(B, 1, 1, capacity)``."""
        self.keys[self.rows, :, self.positions] = k[:, :, 0]  # an in-place index_put, also when compiled
        self.values[self.rows, :, self.positions] = v[:, :, 0]
        return self.keys, self.values, self.key_mask

    def remap_score_mod(self, score_mod):
        return score_mod  # a DecodeStep is built only for models without score modifiers


def check_compilable(model, memory=None, backend=None) -> None:
    """``ValueError`` unless a :class:`DecodeStep` can run ``model`` (the argument ``compile`` of
    ``generate`` names what is missing)."""
    c = model.config
    reasons = []
    if c.positional == "alibi":
        reasons.append("positional='alibi' (ALiBi is a score modifier)")
    if c.sink:
        reasons.append("sink=True (sinks need the log-sum-exp)")
    if c.cross_attention or memory is not None:
        reasons.append("cross-attention")
    if backend is not None:
        reasons.append(f"backend={backend!r} (the step runs backend='sdpa')")
    if model.training:
        reasons.append("training mode (call model.eval())")
    if reasons:
        raise ValueError("compile: the compiled decode step serves decoder-only models with RoPE, learned, "
                         "sinusoidal or no positions, in eval mode and without a forced backend; not "
                         + ", ".join(reasons))


class DecodeStep:
    """``step(tokens (B, 1), positions (B,)) -> logits (B, 1, vocab)`` for ``model`` over ``cache``.

    ``positions[b]`` (int64 on the cache's device) is where row ``b``'s token goes: it attends to
    slots ``0 .. positions[b]`` of the cache (the token itself included), which must hold that
    row's earlier tokens. The cache's host-side lengths are not touched by a step: call
    :meth:`sync_cache` after the last one. ``compiled(**options)`` returns the step compiled with
    ``torch.compile(fullgraph=True, dynamic=False, **options)``.
    """

    def __init__(self, model, cache):
        check_compilable(model)
        if cache.layout() != model.cache_layout():
            raise ValueError(f"cache: layout {cache.layout()} does not fit the model's {model.cache_layout()}")
        self.model, self.cache = model, cache
        # Each layer's buffers as separate tensors (views): a compiled step then writes into them
        # in place (mutating slices of one input would make it copy the whole cache every step).
        self.k, self.v = list(cache.k.unbind(0)), list(cache.v.unbind(0))
        self.capacity = cache.capacity
        emb = model.position_embedding
        if isinstance(emb, LearnedPositionalEmbedding) and self.capacity > emb.max_positions:
            raise ValueError(f"cache: capacity {self.capacity} exceeds the learned position table "
                             f"(max_positions={emb.max_positions})")
        if model.rope is not None:  # built now, outside any compiled region
            model.rope.table(self.capacity, model.token_embedding.weight.dtype, cache.device)
        self.slots = torch.arange(self.capacity, device=cache.device)

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.forward(tokens, positions, self.k, self.v)

    def forward(self, tokens: Tensor, positions: Tensor, k_layers: list[Tensor], v_layers: list[Tensor]) -> Tensor:
        """The step, with the layers' key and value buffers passed in (what is compiled)."""
        model = self.model
        batch = tokens.shape[0]
        x = model.token_embedding(tokens)
        column = positions[:, None]  # (B, 1)
        emb = model.position_embedding
        if isinstance(emb, LearnedPositionalEmbedding):
            x = x + emb.table(column).to(x.dtype)  # in range: capacity <= max_positions
        elif isinstance(emb, SinusoidalEmbedding):
            x = x + emb(column, dtype=x.dtype)
        rope = None
        if model.rope is not None:
            full_cos, signed_sin = model.rope.expanded_table(self.capacity, x.dtype, x.device)
            rope = Rotation.from_expanded(full_cos[column], signed_sin[column], model.rope.interleaved)
        key_mask = (self.slots <= column)[:, None, None, :]  # (B, 1, 1, capacity)
        rows = torch.arange(batch, device=positions.device)
        for block, keys, values in zip(model.blocks, k_layers, v_layers):
            layer = StaticCacheLayer(keys, values, rows, positions, key_mask)
            x = block(x, rope=rope, cache=layer, backend="sdpa")
        return model.lm_head(model.norm(x))

    def compiled(self, **options):
        """This step under ``torch.compile(fullgraph=True, dynamic=False, **options)``."""
        if self.cache.device.type == "cuda":  # CUDA graphs may write into the cache in place
            for t in (*self.k, *self.v):
                torch._dynamo.mark_static_address(t)
        compiled = torch.compile(self.forward, fullgraph=True, dynamic=False, **options)

        def step(tokens: Tensor, positions: Tensor) -> Tensor:
            return compiled(tokens, positions, self.k, self.v)

        return step

    def sync_cache(self, counts: Tensor) -> None:
        """Tell the cache that its rows grew by ``counts (B,)`` tokens (int64, CPU) in steps."""
        self.cache.advance(counts)
