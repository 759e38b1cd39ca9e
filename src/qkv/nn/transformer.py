"""Stacks of :class:`~qkv.nn.TransformerBlock`: an :class:`Encoder` and a causal-LM :class:`Decoder`.

An encoder, a decoder-only LM and an encoder-decoder in a few lines::

    encoder = Encoder(dim=64, num_layers=2, num_heads=4, mlp_dim=256, vocab_size=1000, positional="sinusoidal")
    lm = Decoder(vocab_size=1000, dim=64, num_layers=2, num_heads=4)                 # a small GPT
    seq2seq = Decoder(vocab_size=1000, dim=64, num_layers=2, num_heads=4, cross_attention=True)
    logits = seq2seq(target_ids, memory=encoder(source_ids))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCacheBase, PagedKVCache
from ..cache.base import token_counts
from ..validate import positive_int
from ..masks import causal, key_padding
from . import fused as fusion
from .block import TransformerBlock
from .generation import generate
from .mlp import optional_dropout
from .norms import make_norm
from .positional import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalEmbedding

#: How a stack knows positions: rotary (on q/k), ALiBi (on scores), absolute (added to the input), none.
POSITIONALS = ("rope", "alibi", "learned", "sinusoidal", "none")


def _positional_modules(kind: str, *, dim: int, num_heads: int, head_dim: int, max_positions: int | None,
                        symmetric_alibi: bool, rope: dict) -> tuple[nn.Module | None, RotaryEmbedding | None,
                                                                    ALiBi | None]:
    """(absolute embedding, rotary embedding, ALiBi) for ``kind``; at most one is not None."""
    if kind not in POSITIONALS:
        raise ValueError(f"positional must be one of {POSITIONALS}, got {kind!r}")
    if kind == "learned":
        if max_positions is None:
            raise ValueError("positional='learned' needs max_positions (the size of the table)")
        return LearnedPositionalEmbedding(max_positions, dim), None, None
    if kind == "sinusoidal":
        return SinusoidalEmbedding(dim), None, None
    if kind == "rope":
        return None, RotaryEmbedding(head_dim, **rope), None
    if kind == "alibi":
        return None, None, ALiBi(num_heads, symmetric=symmetric_alibi)
    return None, None, None


def _check_token_ids(input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.is_complex() \
            or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got "
                        f"{input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, seq) with seq >= 1, got {tuple(input_ids.shape)}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")


class Encoder(nn.Module):
    """A bidirectional stack of blocks: ``(B, N, dim)`` embeddings (or ``(B, N)`` token ids when
    built with ``vocab_size``) to ``(B, N, dim)``.

    Args:
        dim, num_layers, num_heads, mlp_dim: width, depth, heads, feed-forward width.
        vocab_size: if given, a token embedding (``token_embedding``) turns ids into vectors.
        positional: ``"none"`` (the input already carries positions), ``"sinusoidal"``,
            ``"learned"`` (needs ``max_positions``), ``"rope"`` or ``"alibi"`` (symmetric distances).
        max_positions: size of the learned position table.
        rope_base: RoPE angle base.
        norm_first: pre-norm blocks (default) or post-norm.
        norm, norm_eps: ``"layernorm"``/``"rmsnorm"`` for blocks and the final norm.
        final_norm: a norm after the last block (default: with pre-norm).
        block_options: passed to every :class:`TransformerBlock` (``num_kv_heads``, ``activation``,
            ``bias``, ``dropout``, ``head_dim``, ``qk_norm``, ...).
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int, mlp_dim: int, *, vocab_size: int | None = None,
                 positional: str = "none", max_positions: int | None = None, rope_base: float = 10000.0,
                 norm_first: bool = True, norm: str = "layernorm", norm_eps: float = 1e-5,
                 final_norm: bool | None = None, **block_options):
        super().__init__()
        positive_int("num_layers", num_layers)
        self.token_embedding = None if vocab_size is None else nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_dim, norm_first=norm_first, norm=norm, norm_eps=norm_eps,
                             **block_options) for _ in range(num_layers))
        attn = self.blocks[0].attn
        self.position_embedding, self.rope, self.alibi = _positional_modules(
            positional, dim=dim, num_heads=num_heads, head_dim=attn.head_dim, max_positions=max_positions,
            symmetric_alibi=True, rope={"base": rope_base})
        final_norm = norm_first if final_norm is None else final_norm
        self.norm = make_norm(norm, dim, eps=norm_eps, bias=block_options.get("bias", True)) if final_norm else None

    def forward(self, x: Tensor, *, mask=None, backend: str | None = None) -> Tensor:
        """``x``: ``(B, N, dim)``, or ``(B, N)`` token ids with ``vocab_size``. ``mask``: a qkv mask
        for every layer (e.g. :func:`qkv.key_padding` for padded batches). Returns ``(B, N, dim)``."""
        if self.token_embedding is not None:
            _check_token_ids(x, self.token_embedding.num_embeddings)
            x = self.token_embedding(x)
        elif not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 3:
            raise ValueError(f"x must be float embeddings (batch, seq, dim) (or build the Encoder with vocab_size "
                             f"to pass token ids), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        positions = torch.arange(x.shape[1], device=x.device)
        if self.position_embedding is not None:
            x = x + _absolute(self.position_embedding, positions, x.dtype, what="x")
        score_mod = self.alibi.score_mod() if self.alibi is not None else None
        for block in self.blocks:
            x = block(x, mask=mask, score_mod=score_mod, rope=self.rope, positions=positions, backend=backend)
        return x if self.norm is None else self.norm(x)


def _absolute(embedding: nn.Module, positions: Tensor, dtype: torch.dtype, *, padding: Tensor | None = None,
              what: str) -> Tensor:
    """Absolute position embeddings ``(*positions.shape, dim)`` in ``dtype``.

    Padding tokens (``padding (B, N)`` True) are embedded at position 0 instead of their own,
    which may lie beyond a learned table: no real token sees them and their outputs are
    discarded. A real token beyond the learned table is a ``ValueError`` about ``what``."""
    if padding is not None:
        positions = torch.where(padding, 0, positions)
    if isinstance(embedding, SinusoidalEmbedding):
        return embedding(positions, dtype=dtype)
    length = int(positions.max()) + 1 if positions.numel() else 0
    if length > embedding.max_positions:
        raise ValueError(f"{what}: sequence length {length} exceeds max_positions={embedding.max_positions}, the "
                         "size of the learned position table")
    return embedding(positions).to(dtype)


@dataclass(frozen=True)
class DecoderConfig:
    """The architecture of a :class:`Decoder` (a pre-norm causal LM).

    ``mlp_dim`` defaults (None) to ``4 * dim``; ``head_dim`` to ``dim // num_heads``. ``positional`` is
    ``"rope"`` (default), ``"alibi"``, ``"learned"`` (needs ``max_positions``), ``"sinusoidal"``
    or ``"none"``; the ``rope_*`` fields configure :class:`~qkv.nn.RotaryEmbedding`.
    ``tie_weights`` shares the token embedding with the LM head. ``sink`` gives every attention
    layer learned sink logits; ``cross_attention`` (with ``memory_dim``) makes it the decoder of an
    encoder-decoder.
    """

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    mlp_dim: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    positional: str = "rope"
    max_positions: int | None = None
    rope_base: float = 10000.0
    rotary_dim: int | None = None
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    bias: bool = False
    dropout: float = 0.0
    tie_weights: bool = True
    qk_norm: bool = False
    sink: bool = False
    cross_attention: bool = False
    memory_dim: int | None = None


class Decoder(nn.Module):
    """A decoder-only language model (GPT-style, pre-norm): token embedding, positions, blocks of
    causal self-attention (and cross-attention to ``memory`` if configured), final norm, LM head.

    Build it from a :class:`DecoderConfig` or its fields as keywords::

        model = Decoder(vocab_size=1000, dim=128, num_layers=4, num_heads=4)
        model = Decoder(config, dropout=0.1)            # a config with some fields replaced

    Weights start as in GPT-2: normal(0, 0.02), residual output projections scaled by
    ``1 / sqrt(2 * num_layers)``, zero biases.

    Submodules: ``token_embedding``, ``position_embedding`` / ``rope`` / ``alibi`` (whichever the
    positional scheme uses, else None), ``blocks``, ``norm``, ``lm_head``.
    """

    def __init__(self, config: DecoderConfig | None = None, /, **options):
        super().__init__()
        if config is None:
            config = DecoderConfig(**options)
        elif not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        else:
            config = dataclasses.replace(config, **options)
        self.config = c = config
        for name in ("vocab_size", "dim", "num_layers", "num_heads"):
            positive_int(name, getattr(c, name))
        mlp_dim = 4 * c.dim if c.mlp_dim is None else positive_int("mlp_dim", c.mlp_dim)
        self.token_embedding = nn.Embedding(c.vocab_size, c.dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.dim, c.num_heads, mlp_dim, num_kv_heads=c.num_kv_heads, norm_first=True,
                             norm=c.norm, norm_eps=c.norm_eps, activation=c.activation, bias=c.bias,
                             dropout=c.dropout, cross_attention=c.cross_attention, memory_dim=c.memory_dim,
                             head_dim=c.head_dim, qk_norm=c.qk_norm, sink=c.sink)
            for _ in range(c.num_layers))
        attn = self.blocks[0].attn
        self._kv_shape = (c.num_layers, attn.num_kv_heads, attn.head_dim)  # per token and layer, in a cache
        self.position_embedding, self.rope, self.alibi = _positional_modules(
            c.positional, dim=c.dim, num_heads=c.num_heads, head_dim=attn.head_dim, max_positions=c.max_positions,
            symmetric_alibi=False, rope={"rotary_dim": c.rotary_dim, "base": c.rope_base,
                                         "scaling": c.rope_scaling, "scaling_factor": c.rope_scaling_factor})
        self.dropout = optional_dropout(c.dropout)
        self.norm = make_norm(c.norm, c.dim, eps=c.norm_eps, bias=c.bias)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.token_embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "mlp.fc2.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    #: :class:`qkv.nn.fused.Stacks` (``lm_head``, and ``norm`` as a direct call) while inside
    #: :func:`qkv.nn.fused.fused_projections`.
    _fused = None

    def _head(self, x: Tensor) -> Tensor:
        """``lm_head(norm(x))``, the logits of the last block's output."""
        stacks = self._fused
        norms = fusion.norms_serve(stacks)
        h = self.norm(x) if norms is None else norms[0](x)
        stack = None if stacks is None else stacks.out
        return F.linear(h, stack.weight, stack.bias) if fusion.serves(stack, h) else self.lm_head(h)

    def cache_spec(self) -> dict:
        """Keyword arguments describing this model's keys and values for a cache constructor:
        ``KVCache(batch_size=2, capacity=512, **model.cache_spec())``."""
        attn = self.blocks[0].attn
        weight = self.token_embedding.weight
        return {"num_layers": len(self.blocks), "num_kv_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
                "dtype": weight.dtype, "device": weight.device}

    def cache_layout(self) -> tuple:
        """What a cache must store for this model, as :meth:`qkv.cache.KVCacheBase.layout` gives it."""
        weight = self.token_embedding.weight
        return (*self._kv_shape, weight.dtype, weight.device)

    def check_input_ids(self, input_ids) -> None:
        """``TypeError``/``ValueError`` unless ``input_ids`` is an integer ``(B, N)`` tensor of valid ids."""
        _check_token_ids(input_ids, self.config.vocab_size)

    def forward(self, input_ids: Tensor, cache=None, *, lengths=None, mask=None, memory: Tensor | None = None,
                memory_mask=None, backend: str | None = None, check_ids: bool = True) -> Tensor:
        """Next-token logits ``(B, N, vocab_size)`` for ``input_ids (B, N)``.

        Args:
            input_ids: token ids; with a cache, the tokens that follow what the cache holds.
            cache: a :mod:`qkv.cache` cache (``KVCache``, ``PagedKVCache.batch(...)``,
                ``StreamingKVCache``) sized for this model (``cache_spec()``): the new tokens attend
                to everything cached, and are appended to it.
            lengths: ``(B,)`` real tokens per row when rows are right-padded to ``N`` (prompts of
                different lengths). With a cache, only those are appended (``0 <= lengths[b] <= N``;
                0 adds nothing to row ``b``). Without one (``1 <= lengths[b] <= N``), keys beyond
                ``lengths[b]`` are hidden from every query: the default causal mask hides them
                already, a given ``mask`` is combined with :func:`qkv.key_padding`. Either way,
                padding on the right never changes the logits of real tokens; the logits of padding
                tokens are meaningless.
            mask: without a cache, replaces the default :func:`qkv.causal` mask.
            memory, memory_mask: the encoder output ``(B, M, memory_dim)`` and its mask, for
                cross-attention.
            backend: :func:`qkv.attention` backend.
            check_ids: check that ``input_ids`` are valid token ids (reading them back: a device sync).
                ``False`` is for callers whose ids are valid by construction, such as
                :meth:`generate` feeding back the tokens it sampled.
        """
        if check_ids:
            self.check_input_ids(input_ids)
        batch, n = input_ids.shape
        step = None
        if cache is None:
            counts = None if lengths is None else token_counts(lengths, name="lengths", batch_size=batch,
                                                               num_tokens=n, minimum=1)
            positions, rope_positions, end = torch.arange(n, device=input_ids.device), None, n
            if mask is None:
                mask = causal()  # right padding follows every real token: causality hides it already
            elif counts is not None:
                mask = _hide_padding_keys(mask, counts)
        else:
            _check_cache(cache)
            if mask is not None:
                raise ValueError("mask: with a cache the mask is the cache's (causal over each sequence); "
                                 "pass mask=None")
            if cache.batch_size != batch:
                raise ValueError(f"cache holds {cache.batch_size} sequences, but input_ids has batch size {batch}")
            if lengths is not None:
                lengths = token_counts(lengths, name="lengths", batch_size=batch, num_tokens=n)
            # Checked here once per step; if the cache does not fit, every layer's update says how.
            step = cache.begin_step(n, lengths, checked=cache.layout() == self.cache_layout())
            positions, rope_positions, end = None, step.rope_positions, step.end
        try:
            x = self.token_embedding(input_ids)
            if self.position_embedding is not None:
                if step is not None:
                    positions, counts = step.positions, step.counts
                padding = None if counts is None else \
                    torch.arange(n, device=x.device) >= counts.to(x.device)[:, None]
                what = "input_ids" if cache is None else "input_ids (after the tokens already cached)"
                x = x + _absolute(self.position_embedding, positions, x.dtype, padding=padding, what=what)
            if self.dropout is not None:
                x = self.dropout(x)
            score_mod = self.alibi.score_mod() if self.alibi is not None else None
            rope = None  # one rotation per step, shared by the queries and keys of every layer
            if self.rope is not None:
                rope = self.rope.rotation(rope_positions, n, dtype=x.dtype, device=x.device, end=end)
            for i, block in enumerate(self.blocks):
                x = block(x, mask=mask, score_mod=score_mod, rope=rope, positions=positions,
                          cache=None if cache is None else cache.layer(i), memory=memory, memory_mask=memory_mask,
                          backend=backend)
            if cache is not None:
                cache.commit()
            return self._head(x)
        except BaseException:
            if cache is not None:
                cache.abort()  # the step failed: nothing is committed, and the sequences are free again
            raise

    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos=None, *, lengths=None, cache=None,
                 generator: torch.Generator | None = None, memory: Tensor | None = None, memory_mask=None,
                 backend: str | None = None, compile: bool | dict = False) -> Tensor:
        """Sample up to ``max_new_tokens`` tokens after each prompt.

        The prompts run through the model once (prefill, filling the cache); then each new token
        is one forward step of ``(B, 1)`` from the cache. Call ``model.eval()`` first (dropout).

        Args:
            input_ids: ``(B, N)`` prompts, right-padded when ``lengths`` is given.
            max_new_tokens: how many tokens to produce at most.
            temperature: softmax temperature; ``0`` picks the most likely token (greedy).
            top_k: sample only among the ``top_k`` most likely tokens.
            top_p: sample only from the nucleus of probability ``top_p``.
            eos: a token id (or list of ids) that ends a sequence; a finished row repeats its first
                eos id, and generation stops once every row has finished.
            lengths: ``(B,)`` prompt lengths for a ragged batch.
            cache: the cache to decode from; default a new :class:`~qkv.cache.KVCache` of exactly the
                needed capacity, ``max(lengths) + max_new_tokens - 1``. Pass a
                :class:`~qkv.cache.StreamingKVCache` to run longer than any preallocated capacity, or
                a batch of a paged pool, ``pool.batch(seq_ids)``. The cache ends holding each prompt
                and every returned token but the last, which is returned, not fed back: to continue
                decoding from it, feed that last token first.
            generator: random source for sampling.
            memory, memory_mask, backend: as for :meth:`forward`.
            compile: decode with a fixed-shape step compiled by ``torch.compile(fullgraph=True)``
                (:mod:`qkv.nn.compiled`; on CUDA with ``mode="reduce-overhead"``, CUDA graphs); a
                dict instead of True is passed to ``torch.compile`` as options. Needs a
                :class:`~qkv.cache.KVCache` (the default: one kept on the model, its size rounded
                up so that other prompt and generation lengths reuse it and the compiled step),
                RoPE/learned/sinusoidal/no positions, no sinks, no cross-attention. The first call
                of a batch size or cache size compiles (seconds); the prefill and the first step
                run eagerly.

        Returns:
            ``(B, T)`` int64 new token ids, ``T <= max_new_tokens`` (fewer if all rows hit ``eos``).
        """
        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos, lengths=lengths,
                        cache=cache, generator=generator, memory=memory, memory_mask=memory_mask, backend=backend,
                        compile=compile)


def _check_cache(cache) -> None:
    if isinstance(cache, PagedKVCache):
        raise TypeError("cache: a PagedKVCache is a pool of sequences; run the model on a batch of them, "
                        "cache=pool.batch(seq_ids)")
    if not isinstance(cache, KVCacheBase):
        raise TypeError(f"cache must be a qkv.cache cache (KVCache, StreamingKVCache, or PagedKVCache.batch(seq_ids)), "
                        f"got {type(cache).__name__}")


def _hide_padding_keys(mask, lengths: Tensor):
    """``mask`` and every row's keys beyond ``lengths[b]`` hidden (a qkv Mask)."""
    if isinstance(mask, Tensor) and mask.dtype != torch.bool:
        raise ValueError("mask: lengths cannot be combined with an additive float mask; pass a bool mask or a "
                         "qkv Mask, or put -inf on the padding keys yourself and leave lengths out")
    return key_padding(lengths) & mask
