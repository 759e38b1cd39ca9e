"""Multi-head attention as an ``nn.Module``: projections around :func:`qkv.attention`.

``(B, N, E)`` in, ``(B, N, E)`` out, batch first. Queries, keys and values are projected to
``num_heads`` (queries) and ``num_kv_heads`` (keys/values; fewer for GQA, one for MQA) heads of
``head_dim``, optionally RMS-normalised per head (QK-norm), rotated by RoPE, appended to a KV cache,
attended with any qkv mask or score modifier, and projected back.

A learned *sink* logit per head (``sink=True``) adds an "attend to nothing" column to every
softmax row, as some recent open-weight models do: with ``out, lse`` from the attention,
``softmax([s, sink]) @ [v, 0] = out * sigmoid(lse - sink)``.

For a drop-in replacement of :class:`torch.nn.MultiheadAttention` (its call signature, masks and
sequence-first layout) see :class:`qkv.nn.compat.MultiheadAttention`; :meth:`MultiHeadAttention.from_torch`
copies such a module's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import attention as _attention
from .. import attention_weights as _attention_weights
from ..linear import swap as _swap
from ..linear.features import PerformerFeatures
from ..validate import positive_int
from . import fused as fusion
from . import paged as _paged
from .positional import Rotation

#: eps of the per-head RMS norms used by ``qk_norm=True``.
QK_NORM_EPS = 1e-6


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention over ``(B, N, E)`` inputs.

    Args:
        embed_dim: ``E``, the width of the queries and of the output.
        num_heads: query heads ``Hq``.
        num_kv_heads: key/value heads ``Hkv`` (default ``Hq``); must divide ``Hq``.
        kdim, vdim: widths of the key and value inputs (default ``E``), for cross-attention.
        bias: biases on the projections.
        fused_qkv: one ``qkv_proj`` ``Linear(E, (Hq + 2 Hkv) * head_dim)`` instead of ``q_proj``,
            ``k_proj``, ``v_proj`` (self-attention runs one matmul; cross-attention uses the
            slices). Needs ``kdim == vdim == E``.
        dropout: probability of dropping an attention weight while training.
        qk_norm: RMS-normalise each query and key head (``q_norm``, ``k_norm``) before RoPE.
        head_dim: per-head width ``D`` (default ``E // Hq``).
        sink: learn one sink logit per query head (``sink_logits``, initialised to 0).
        attention: ``"exact"`` (softmax), ``"linear"`` (``elu + 1`` kernel), ``"performer"`` (FAVOR+
            with ``num_features`` random features drawn from ``feature_seed``, in ``performer``; redraw
            with ``module.performer.redraw()``), or a sparse :class:`qkv.Mask` pattern that every call
            attends within; see :mod:`qkv.linear.swap`. Change it later with :meth:`set_attention`.

    Submodules: ``q_proj``, ``k_proj``, ``v_proj`` (or ``qkv_proj``), ``out_proj``
    (``Linear(Hq * D, E)``), and with ``qk_norm`` ``q_norm``, ``k_norm``.

    Inside :func:`qkv.nn.fused.fused_projections` (``Decoder.generate`` decodes in one), separate
    projections run as one product while grad mode is off; the numbers are the same.
    """

    #: :class:`qkv.nn.fused.Stacks` (stacked ``q_proj, k_proj, v_proj``; a copy of ``out_proj``)
    #: while inside :func:`qkv.nn.fused.fused_projections`.
    _fused = None

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, fused_qkv: bool = False, dropout: float = 0.0,
                 qk_norm: bool = False, head_dim: int | None = None, sink: bool = False, attention="exact",
                 num_features: int = 256, feature_seed: int = 0, device=None, dtype=None):
        super().__init__()
        self.embed_dim = positive_int("embed_dim", embed_dim)
        self.num_heads = positive_int("num_heads", num_heads)
        self.num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), "
                                 "or pass head_dim")
            head_dim = embed_dim // num_heads
        self.head_dim = positive_int("head_dim", head_dim)
        self.kdim = embed_dim if kdim is None else positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else positive_int("vdim", vdim)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.fused_qkv = bool(fused_qkv)
        factory = {"device": device, "dtype": dtype}
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self._widths = [q_width, kv_width, kv_width]
        if self.fused_qkv:
            if self.kdim != embed_dim or self.vdim != embed_dim:
                raise ValueError(f"fused_qkv needs kdim == vdim == embed_dim ({embed_dim}), "
                                 f"got kdim={self.kdim}, vdim={self.vdim}")
            self.qkv_proj = nn.Linear(embed_dim, q_width + 2 * kv_width, bias=bias, **factory)
        else:
            self.q_proj = nn.Linear(embed_dim, q_width, bias=bias, **factory)
            self.k_proj = nn.Linear(self.kdim, kv_width, bias=bias, **factory)
            self.v_proj = nn.Linear(self.vdim, kv_width, bias=bias, **factory)
        self.out_proj = nn.Linear(q_width, embed_dim, bias=bias, **factory)
        self.qk_norm = bool(qk_norm)
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS, **factory)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS, **factory)
        self.sink_logits = nn.Parameter(torch.zeros(num_heads, **factory)) if sink else None
        self.performer = None
        self.set_attention(attention, num_features=num_features, feature_seed=feature_seed)

    def set_attention(self, attention, *, num_features: int = 256, feature_seed: int = 0) -> MultiHeadAttention:
        """Swap the attention this module computes (the ``attention`` argument of the constructor);
        ``"performer"`` draws ``num_features`` random features from ``feature_seed``."""
        self.attention = _swap.check_option(attention)
        self.performer = None
        if self.attention == "performer":
            weight = self.out_proj.weight
            self.performer = PerformerFeatures(self.head_dim, num_features, seed=feature_seed, device=weight.device,
                                               dtype=weight.dtype)
        return self

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None, *, mask=None,
                score_mod=None, rope=None, positions=None, cache=None, need_weights: bool = False,
                average_attn_weights: bool = True, backend: str | None = None):
        """Attend.

        Args:
            query: ``(B, N, E)``.
            key: ``(B, S, kdim)``; None for self-attention (``key = value = query``).
            value: ``(B, S, vdim)``; None means ``value = key``.
            mask: any mask :func:`qkv.attention` takes (a :class:`qkv.Mask`, a bool tensor with
                True = may attend, or an additive float tensor), broadcastable to ``(B, Hq, N, S)``.
                Not with ``cache``: the cache supplies the mask.
            score_mod: a :mod:`qkv.scores` modifier (ALiBi, soft-capping, relative bias).
            rope: a :class:`qkv.nn.RotaryEmbedding` applied to queries and keys (self-attention),
                or a :class:`qkv.nn.positional.Rotation` it made for this step's positions (a model
                computes one per step and shares it across layers; ``positions`` is then unused).
            positions: positions of the ``N`` tokens for ``rope``: an int offset, ``(N,)`` or
                ``(B, N)``; default ``0..N-1``, or the cache's positions when ``cache`` is given.
            cache: one layer of a KV cache (``kv_cache.layer(i)``, see :mod:`qkv.cache`) between its
                ``begin`` and ``commit``: the new keys/values are appended and all cached ones attended.
            need_weights: also return the attention weights, from the materialised reference path.
            average_attn_weights: average the weights over heads (``(B, N, S)``) or not
                (``(B, Hq, N, S)``).
            backend: passed to :func:`qkv.attention`.

        Returns:
            ``out (B, N, E)``, or ``(out, weights)`` with ``need_weights``; weights are float32
            (float64 for float64 inputs), before dropout, and include the sink's share.
        """
        self_attention = key is None
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value)
        if cache is not None:
            if not self_attention:
                raise ValueError("cache: a KV cache serves self-attention only; pass key=None")
            if mask is not None:
                raise ValueError("mask: with a cache, the cache builds the mask (causal over each sequence's "
                                 "own positions); pass mask=None")
        if rope is not None and not self_attention:
            raise ValueError("rope: rotary embeddings apply to self-attention only (key=None)")
        batch, n = query.shape[0], query.shape[1]
        # (B, N, H, D): heads split off, not yet moved before the tokens
        qk, q, k, v = self._project_heads_last(query, key, value, joint=rope is not None and not self.qk_norm)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if not isinstance(rope, Rotation):  # one rotation (a table lookup) for q and k
                end = None
                if cache is not None and positions is None:
                    positions, end = cache.rope_positions, cache.position_end
                like = v  # the dtype and device of q
                rope = rope.rotation(positions, n, dtype=like.dtype, device=like.device, end=end)
            if qk is not None:  # q and k side by side (one fused projection): one rotation
                qk = rope.heads_last(qk)
                q, k = qk[:, :, :self.num_heads], qk[:, :, self.num_heads:]
            else:
                q, k = rope.heads_last(q), rope.heads_last(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D)
        offsets = {}
        dropout_p = self.dropout if self.training else 0.0
        sink = self.sink_logits is not None
        exact = isinstance(self.attention, str) and self.attention == "exact"
        result = attend = None
        if cache is not None:
            if score_mod is not None:
                score_mod = cache.remap_score_mod(score_mod)
            if (q.is_cuda or _paged.INTERPRETING) and _paged.eligible(
                    cache, q, k, v, backend=backend, exact=exact, need_weights=need_weights, dropout_p=dropout_p):
                # a paged cache's decode step, its pages read in place (qkv.nn.paged); CPU: one test
                result = _paged.attend_in_place(cache, q, k, v, score_mod, sink)
            if result is None:
                k, v, mask = cache.update(k, v)
                q_offset, k_offset = getattr(cache, "offsets", (None, 0))
                if q_offset is not None or not (isinstance(k_offset, int) and k_offset == 0):
                    offsets = {"q_offset": q_offset, "k_offset": k_offset}  # the tokens' true positions
                attend = getattr(cache, "attend", None)  # a fixed-shape step's layer runs SDPA itself
        if result is None and exact:
            if attend is not None and not sink and score_mod is None and not dropout_p and not offsets:
                result = attend(q, k, v, mask)
            else:
                result = _attention(q, k, v, mask, score_mod=score_mod, dropout_p=dropout_p, return_lse=sink,
                                    backend=backend, **offsets)
        elif result is None:  # approximate or sparse attention (qkv.linear.swap)
            result = _swap.attend(self.attention, q, k, v, mask, features=self.performer, score_mod=score_mod,
                                  dropout_p=dropout_p, return_lse=sink, backend=backend, **offsets)
        out, gate = result, None
        if sink:
            out, lse = result
            gate = torch.sigmoid(lse - self.sink_logits.to(lse.dtype)[:, None])  # (B, Hq, N)
            out = out * gate.unsqueeze(-1).to(out.dtype)
        # (B, Hq, N, Dv) -> (B, N, Hq * Dv); for one token the memory order is already that
        out = out.reshape(batch, 1, -1) if n == 1 else out.transpose(1, 2).reshape(batch, n, -1)
        stacks = self._fused
        stack = None if stacks is None else stacks.out
        out = F.linear(out, stack.weight, stack.bias) if fusion.serves(stack, out) else self.out_proj(out)
        if not need_weights:
            return out
        weights = _attention_weights(q, k, mask=_swap.weights_mask(self.attention, mask), score_mod=score_mod,
                                     **offsets)
        if gate is not None:
            weights = weights * gate.unsqueeze(-1).to(weights.dtype)
        return out, weights.mean(dim=1) if average_attn_weights else weights

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        same = key is query and value is query and self.kdim == self.vdim == self.embed_dim  # self-attention
        checks = (("query", query, self.embed_dim),) if same else \
            (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim))
        for name, t, width in checks:
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating torch.Tensor, got "
                                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(f"{name} must have shape (batch, seq, {width}), got {tuple(t.shape)}")
        if same:
            return
        if not query.shape[0] == key.shape[0] == value.shape[0]:
            raise ValueError(f"query, key and value must share the batch size, got "
                             f"{query.shape[0]}, {key.shape[0]}, {value.shape[0]}")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have the same length, got {key.shape[1]} and {value.shape[1]}")

    def _project_heads_last(self, query: Tensor, key: Tensor, value: Tensor, *, joint: bool = False):
        """``(qk, q, k, v)``: projected ``q (B, N, Hq, D)``, ``k, v (B, S, Hkv, D)`` (heads split off,
        before the tokens are moved behind them) and ``qk`` None; or with ``joint``, when
        self-attention ran one product, ``qk (B, N, Hq + Hkv, D)`` (queries and keys side by side,
        to rotate in one go) with ``q`` and ``k`` None."""
        self_input = key is query and value is query
        stacks = self._fused
        stack = None if stacks is None else stacks.proj
        if self_input and fusion.serves(stack, query):
            y = F.linear(query, stack.weight, stack.bias)  # one product for q, k and v (qkv.nn.fused)
        elif self.fused_qkv and self_input:
            y = self.qkv_proj(query)
        else:
            if self.fused_qkv:
                weights = self.qkv_proj.weight.split(self._widths, dim=0)
                biases = self.qkv_proj.bias.split(self._widths) if self.qkv_proj.bias is not None else (None,) * 3
                q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))
            else:
                q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
            return None, self._split_heads(q, self.num_heads), self._split_heads(k, self.num_kv_heads), \
                self._split_heads(v, self.num_kv_heads)
        hq, hkv = self.num_heads, self.num_kv_heads
        heads = y.view(query.shape[0], query.shape[1], hq + 2 * hkv, self.head_dim)  # one view, then slices
        qk, v = heads[:, :, :hq + hkv], heads[:, :, hq + hkv:]
        if joint:
            return qk, None, None, v  # the caller rotates qk and slices q and k from the result
        return None, qk[:, :, :hq], qk[:, :, hq:], v

    def _split_heads(self, x: Tensor, heads: int) -> Tensor:
        """``(B, N, heads * D) -> (B, N, heads, D)``."""
        return x.reshape(x.shape[0], x.shape[1], heads, self.head_dim)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiHeadAttention:
        """A :class:`MultiHeadAttention` with the weights of ``module`` (same device and dtype).

        Called with batch-first inputs and qkv masks (True = may attend), it computes what
        ``module`` computes. ``add_bias_kv`` and ``add_zero_attn`` have no counterpart here and
        raise ``ValueError``.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv and add_zero_attn are not supported")
        same_dims = module._qkv_same_embed_dim
        weight = module.out_proj.weight
        ours = cls(module.embed_dim, module.num_heads, kdim=module.kdim, vdim=module.vdim,
                   bias=module.in_proj_bias is not None, fused_qkv=same_dims, dropout=module.dropout,
                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if same_dims:
                ours.qkv_proj.weight.copy_(module.in_proj_weight)
            else:
                for proj, w in ((ours.q_proj, module.q_proj_weight), (ours.k_proj, module.k_proj_weight),
                                (ours.v_proj, module.v_proj_weight)):
                    proj.weight.copy_(w)
            if module.in_proj_bias is not None:
                if same_dims:
                    ours.qkv_proj.bias.copy_(module.in_proj_bias)
                else:
                    for proj, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), module.in_proj_bias.chunk(3)):
                        proj.bias.copy_(b)
                ours.out_proj.bias.copy_(module.out_proj.bias)
            ours.out_proj.weight.copy_(module.out_proj.weight)
        return ours.train(module.training)

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if self.num_kv_heads != self.num_heads:
            parts.append(f"num_kv_heads={self.num_kv_heads}")
        parts.append(f"head_dim={self.head_dim}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        if self.sink_logits is not None:
            parts.append("sink=True")
        if not (isinstance(self.attention, str) and self.attention == "exact"):
            parts.append(f"attention={self.attention!r}")
        return ", ".join(parts)
