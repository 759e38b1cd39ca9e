"""A drop-in for :class:`torch.nn.MultiheadAttention` that runs on :func:`qkv.attention`.

Same constructor, same ``forward`` signature, same layouts (sequence-first unless
``batch_first=True``, unbatched ``(L, E)`` inputs too) and the same mask conventions, which are
torch's, not qkv's: a bool ``attn_mask`` or ``key_padding_mask`` marks with True the positions
that may NOT be attended; float masks are added to the scores. Migrating is changing an import::

    from qkv.nn.compat import MultiheadAttention   # was: from torch.nn import MultiheadAttention
    mha = MultiheadAttention.from_torch(torch_mha)  # or copy the weights of an existing module

It also serves as the ``self_attn`` of :class:`torch.nn.TransformerEncoderLayer` (and of
:class:`torch.nn.TransformerEncoder` built from one) in training and eval mode: torch's fused
"fast path" for those layers would run torch's own kernel on a packed ``in_proj_weight`` instead
of this module, so the module reports ``_qkv_same_embed_dim = False``, which makes torch decline
the fast path and call this module's ``forward``. (A ``TransformerEncoder`` built with the default
``enable_nested_tensor=True`` warns that it will not use nested tensors, for that reason.)

Differences: ``add_bias_kv`` and ``add_zero_attn`` are not supported (``ValueError``); a query row
whose keys are all masked gives zeros where torch gives NaN; returned weights are those before
dropout; the ``is_causal`` hint is accepted but the given ``attn_mask`` is what is applied; the
weights live in ``self.attn`` (``qkv_proj`` or ``q_proj``/``k_proj``/``v_proj``, and ``out_proj``),
not in torch's ``in_proj_weight``/``q_proj_weight`` parameters (``in_proj_bias`` can be read);
torch's fused encoder-layer fast path never runs (see above).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import MultiHeadAttention


class MultiheadAttention(nn.Module):
    """:class:`torch.nn.MultiheadAttention`'s interface over a :class:`qkv.nn.MultiHeadAttention`
    (``self.attn``, which holds the weights)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by qkv.nn.compat.MultiheadAttention")
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        self.batch_first = bool(batch_first)
        self.attn = MultiHeadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim, bias=bias,
                                       fused_qkv=kdim == vdim == embed_dim, dropout=dropout, device=device, dtype=dtype)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiheadAttention:
        """The same attention as ``module`` (weights copied, same ``batch_first`` and training mode)."""
        compat = cls.__new__(cls)
        nn.Module.__init__(compat)
        compat.attn = MultiHeadAttention.from_torch(module)
        compat.batch_first = bool(module.batch_first)
        return compat.train(module.training)

    @property
    def embed_dim(self) -> int:
        return self.attn.embed_dim

    @property
    def num_heads(self) -> int:
        return self.attn.num_heads

    @property
    def in_proj_bias(self) -> Tensor | None:
        """The query, key and value projection biases in torch's layout ``(3 * E,)`` (read-only;
        with fused projections the ``qkv_proj.bias`` parameter itself), or None without biases."""
        attn = self.attn
        if attn.fused_qkv:
            return attn.qkv_proj.bias
        if attn.q_proj.bias is None:
            return None
        return torch.cat((attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """False: torch's flag that a packed ``in_proj_weight`` exists for its fused kernels to use.
        There is none here, so :class:`torch.nn.TransformerEncoderLayer` declines its fast path
        and calls :meth:`forward`, which runs on qkv."""
        return False

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As :meth:`torch.nn.MultiheadAttention.forward`: returns ``(attn_output, attn_weights)``,
        the weights ``(B, L, S)`` averaged over heads or ``(B, H, L, S)``, None unless ``need_weights``."""
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint about attn_mask and needs attn_mask (as in torch)")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor) or t.dim() not in (2, 3):
                raise ValueError(f"{name} must be a 2-D (unbatched) or 3-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = _same_for_same(lambda t: t.unsqueeze(0), query, key, value)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = _same_for_same(lambda t: t.transpose(0, 1), query, key, value)
        batch, nq, nk = query.shape[0], query.shape[1], key.shape[1]
        mask = _qkv_mask(attn_mask, key_padding_mask, batch, self.num_heads, nq, nk, query.dtype)
        is_self = key is query and value is query
        result = self.attn(query, None if is_self else key, None if is_self else value, mask=mask,
                           need_weights=need_weights, average_attn_weights=average_attn_weights)
        out, weights = result if need_weights else (result, None)
        if weights is not None:
            weights = weights.to(query.dtype)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _same_for_same(fn, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``fn`` applied to each of the three, keeping ``key is query`` (self-attention runs one fused
    projection) and ``value is key`` where they hold."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = k if value is key else (q if value is query else fn(value))
    return q, k, v


def _qkv_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int, nq: int, nk: int,
              dtype: torch.dtype):
    """torch's two masks (True / -inf = excluded) as one qkv mask: None, a bool tensor
    (True = may attend) when both are bool, else an additive float tensor ``(B|1, H|1, L, S)``."""
    parts = []
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (nq, nk):
            parts.append(attn_mask[None, None])
        elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (batch * heads, nq, nk):
            parts.append(attn_mask.reshape(-1, heads, nq, nk))
        else:
            raise ValueError(f"attn_mask must have shape (L, S) = {(nq, nk)} or (N * num_heads, L, S) = "
                             f"{(batch * heads, nq, nk)}, got {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, nk):
            raise ValueError(f"key_padding_mask must have shape (N, S) = {(batch, nk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        parts.append(key_padding_mask[:, None, None, :])
    for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"{name} must be bool or floating, got {mask.dtype}")
    if not parts:
        return None
    if all(part.dtype == torch.bool for part in parts):
        excluded = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return ~excluded
    bias = 0
    for part in parts:
        bias = bias + (torch.zeros(part.shape, dtype=dtype, device=part.device).masked_fill(part, float("-inf"))
                       if part.dtype == torch.bool else part.to(dtype))
    return bias
