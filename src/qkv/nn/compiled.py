"""A decoding step without host-side state, which ``torch.compile(fullgraph=True)`` captures whole.

An eager step of :class:`~qkv.nn.Decoder` keeps its cache's bookkeeping on the host (lengths,
step plans), which a graph cannot replay. :class:`DecodeStep` runs one new token per row straight
on the buffers of a :class:`~qkv.cache.KVCache`: the new keys and values are scattered into them
at each row's position (rows may differ in length), the RoPE rotation is looked up from the
model's cos/sin table by position, and attention reads the first ``length`` slots of every layer.
Nothing is read back from the device and no Python state changes, so the step compiles once.

How many slots a step reads:

- **On the CPU**, exactly the filled ones: ``length`` is the longest row's length after the new
  token, passed as the size of a slot-index tensor marked dynamic, so one graph serves every
  length and a step costs ``O(length)``, as an eager one does. When every row has the same length
  (a batch decoded together) no mask is needed at all; otherwise a bool key mask hides the slots
  beyond each row's position.
- **On CUDA**, all ``capacity`` slots under a key mask: every step then has the same shapes and
  is replayed as one CUDA graph (``mode="reduce-overhead"``). That costs ``O(capacity)`` per step,
  so size the cache to the generation (``generate`` does).

The modules are the model's own (blocks, attention, norms); only the cache layer differs
(:class:`StaticCacheLayer`), and it runs the attention itself: on CUDA with
``F.scaled_dot_product_attention`` (torch's fused kernel is what compiles and replays in a CUDA
graph; ``qkv.explain_dispatch(..., backend="sdpa")`` shows the same choice), on the CPU as two
reductions that inductor turns into loops over the cache (faster there than SDPA's flash
kernel for one query). Slots a step may read
but no token of the row fills are zeroed before decoding (:meth:`DecodeStep.clear_free_slots`),
so that a mask over them is all the guard they need. Inside the step the attention and SwiGLU projections
run as stacked products (:mod:`qkv.nn.fused`; on the CPU transposed copies of every projection)
that the step keeps and brings up to date where the model's weights changed
(:meth:`~DecodeStep.refresh`), so a compiled graph (or CUDA graph) holds the same tensors on
every call. ``Decoder.generate(..., compile=True)`` prefills eagerly, then decodes with
the compiled step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused as fusion
from .positional import LearnedPositionalEmbedding, Rotation, SinusoidalEmbedding


class StaticCacheLayer:
    """One layer of a :class:`~qkv.cache.KVCache` as a :class:`DecodeStep` sees it: the interface
    :class:`~qkv.nn.MultiHeadAttention` uses (``update``, ``remap_score_mod``, ``attend``). Made
    afresh inside each step (no state outlives it, so a compiled step has no Python side effects
    to replay)."""

    #: Not a paged cache: :mod:`qkv.nn.paged`'s in-place route does not apply.
    reads_pages = False

    def __init__(self, keys: Tensor, values: Tensor, rows: Tensor, positions: Tensor, length,
                 key_mask: Tensor | None):
        self.keys, self.values, self.rows, self.positions = keys, values, rows, positions
        self.length, self.key_mask = length, key_mask

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write ``k, v (B, Hkv, 1, D)`` at each row's position; return the first ``length`` slots
        of the keys and values and the key mask ``(B, 1, 1, length)`` (None: every slot is seen)."""
        self.keys[self.rows, :, self.positions] = k[:, :, 0]  # an in-place index_put, also when compiled
        self.values[self.rows, :, self.positions] = v[:, :, 0]
        return self.keys[:, :, :self.length], self.values[:, :, :self.length], self.key_mask

    def remap_score_mod(self, score_mod):
        return score_mod  # a DecodeStep is built only for models without score modifiers

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attention of the step's one query per row over what :meth:`update` returned. The slots
        the mask hides hold zeros (see :meth:`DecodeStep.prepare`) and every row sees its own
        slot, so no row is empty; a query holding NaN/inf gives a NaN row, as everywhere in qkv.
        On CUDA: SDPA (its fused kernels, replayed in a CUDA graph). On the CPU: two reductions
        that inductor fuses into loops over the keys and values (:meth:`_one_query`)."""
        if q.device.type == "cpu":
            return self._one_query(q, k, v, mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]),
                                             enable_gqa=k.shape[1] != q.shape[1])
        return out.masked_fill(~torch.isfinite(q).all(dim=-1, keepdim=True), float("nan"))

    @staticmethod
    def _one_query(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """``softmax(q k^T / sqrt(D)) v`` for ``q (B, Hq, 1, D)`` over ``k (B, Hkv, N, D)``,
        ``v (B, Hkv, N, Dv)`` and a bool ``mask (B, 1, 1, N)`` (True: seen), written as a product
        summed over ``D`` and one summed over ``N``, in float32 at least. Compiled, inductor makes
        each one loop over the cache; that decodes 2-7% faster than SDPA's CPU flash kernel at
        batch 8 (d=256, 4 layers, 8 heads, 288 tokens: 2.34 s against 2.44 s, the same tokens)."""
        batch, q_heads, _, dim = q.shape
        kv_heads = k.shape[1]
        compute = torch.promote_types(q.dtype, torch.float32)
        grouped = q.reshape(batch, kv_heads, q_heads // kv_heads, 1, dim).to(compute)  # (B, Hkv, G, 1, D)
        scores = (grouped * k[:, :, None].to(compute)).sum(-1) * (1.0 / math.sqrt(dim))  # (B, Hkv, G, N)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, 0, 0][:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights[..., None] * v[:, :, None].to(compute)).sum(-2)  # (B, Hkv, G, Dv)
        return out.reshape(batch, q_heads, 1, -1).to(q.dtype)


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
    row's earlier tokens. Call :meth:`prepare` before the first step of a generation and run the
    steps inside ``qkv.nn.fused.fused_projections(model, step.fused)``. The cache's host-side
    lengths are not touched by a step: call :meth:`sync_cache` after the last one. Called
    directly, a step reads all ``capacity`` slots under a key mask; ``compiled(**options)`` returns
    the step compiled with ``torch.compile(fullgraph=True, dynamic=False, **options)``, which reads
    only the filled slots on the CPU (see the module docstring).
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
        # the stacked projections the step multiplies by; on the CPU transposed, and the output
        # projections too (x @ W^T from a contiguous W^T: MKL's faster case for a few rows)
        self.fused = fusion.build(model, transposed=cache.device.type == "cpu")

    def prepare(self) -> None:
        """Before a generation, after the prefill: :meth:`refresh` and :meth:`clear_free_slots`."""
        self.refresh()
        self.clear_free_slots()

    def refresh(self, force: bool = False) -> None:
        """Copy the model's current weights into the stacked projections (in place), where they
        changed since the last copy (another tensor, or one changed in place: its version counter
        moved) or with ``force``. A change made through ``.data`` moves no version counter: then
        pass ``force=True`` (or :func:`forget` the model's compiled step)."""
        for stacks in self.fused.values():
            for stack in stacks.linears():
                stack.refresh(force=force)

    def clear_free_slots(self) -> None:
        """Zero every slot at or beyond each row's length (no token of the row is there)."""
        with torch.no_grad():
            for row, length in enumerate(self.cache.lengths.tolist()):
                if length < self.capacity:
                    self.cache.k[:, row, :, length:].zero_()
                    self.cache.v[:, row, :, length:].zero_()

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.forward(tokens, positions, self.k, self.v, self.slots, True)

    def forward(self, tokens: Tensor, positions: Tensor, k_layers: list[Tensor], v_layers: list[Tensor],
                slots: Tensor, masked: bool) -> Tensor:
        """The step (what is compiled), with the layers' key and value buffers passed in. It reads
        slots ``0 .. len(slots) - 1`` (``slots`` is ``arange(len)``), with a key mask hiding those
        beyond each row's position if ``masked`` (without, every row must be at ``len - 1``)."""
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
        key_mask = (slots <= column)[:, None, None, :] if masked else None  # (B, 1, 1, length)
        rows = torch.arange(batch, device=positions.device)
        length = slots.shape[0]
        for block, keys, values in zip(model.blocks, k_layers, v_layers):
            layer = StaticCacheLayer(keys, values, rows, positions, length, key_mask)
            x = block(x, rope=rope, cache=layer, backend="sdpa")
        return model._head(x)

    def compiled(self, **options):
        """This step under ``torch.compile(fullgraph=True, dynamic=False, **options)``, as
        ``run(tokens, positions, length, uniform)``: ``length`` is the longest row's length after
        the new token and ``uniform`` whether every row has it (then no mask on the CPU)."""
        on_cuda = self.cache.device.type == "cuda"
        if on_cuda:  # CUDA graphs may write into the cache, and read the stacks, in place
            stacked = [t for stacks in self.fused.values() for stack in stacks.linears() for t in stack.tensors()]
            for t in (*self.k, *self.v, *stacked):
                torch._dynamo.mark_static_address(t)
        compiled = torch.compile(self.forward, fullgraph=True, dynamic=False, **options)

        def run(tokens: Tensor, positions: Tensor, length: int, uniform: bool) -> Tensor:
            if on_cuda:  # one shape for every step: all slots, masked
                return compiled(tokens, positions, self.k, self.v, self.slots, True)
            if length >= self.capacity:  # reading the whole buffer would compile a second graph
                return self.forward(tokens, positions, self.k, self.v, self.slots, not uniform)
            slots = self.slots[:length]
            torch._dynamo.maybe_mark_dynamic(slots, 0)  # one graph for every length
            return compiled(tokens, positions, self.k, self.v, slots, not uniform)

        return run

    def sync_cache(self, counts: Tensor) -> None:
        """Tell the cache that its rows grew by ``counts (B,)`` tokens (int64, CPU) in steps."""
        self.cache.advance(counts)


def forget(model) -> None:
    """Drop the compiled decode step and the cache that ``generate(..., compile=True)`` keep on
    ``model`` (the next such call builds and compiles them again)."""
    model.__dict__.pop("_compiled_decode_steps", None)
    model.__dict__.pop("_compiled_decode_cache", None)
